"""Flower's built-in strategies, registered by name and used unchanged.

Each aggregates full adapter tensors; :class:`strategies.decoding.DecodingStrategy`
turns client deltas into full tensors first, so server optimisers (FedAdam, ...) see
the pseudo-gradient they expect.
"""

from __future__ import annotations

from flwr.serverapp import strategy as fs

from strategies.base import STRATEGIES, StrategySpec

_BUILTINS: dict[str, tuple[type, str]] = {
    "fedavg": (fs.FedAvg, "McMahan et al., AISTATS 2017, arXiv 1602.05629"),
    "fedprox": (fs.FedProx, "Li et al., MLSys 2020, arXiv 1812.06127"),
    "fedadam": (fs.FedAdam, "Reddi et al., ICLR 2021, arXiv 2003.00295"),
    "fedyogi": (fs.FedYogi, "Reddi et al., ICLR 2021, arXiv 2003.00295"),
    "fedadagrad": (fs.FedAdagrad, "Reddi et al., ICLR 2021, arXiv 2003.00295"),
    "fedavgm": (fs.FedAvgM, "Hsu et al., arXiv 1909.06335"),
    "fedmedian": (fs.FedMedian, "Yin et al., ICML 2018, arXiv 1803.01498"),
    "fedtrimmedavg": (fs.FedTrimmedAvg, "Yin et al., ICML 2018, arXiv 1803.01498"),
    "krum": (fs.Krum, "Blanchard et al., NeurIPS 2017"),
    "multikrum": (fs.MultiKrum, "Blanchard et al., NeurIPS 2017"),
    "bulyan": (fs.Bulyan, "El Mhamdi et al., ICML 2018, arXiv 1802.07927"),
    "qfedavg": (fs.QFedAvg, "Li et al., ICLR 2020, arXiv 1905.10497"),
}

# Rules that need only Σ n_i·Δ_i / Σ n_i: they run under secure aggregation.
_LINEAR = {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"}

for _name, (_cls, _paper) in _BUILTINS.items():
    STRATEGIES.add(_name, StrategySpec(factory=_cls, paper=_paper, linear=_name in _LINEAR))
