"""Use a finished run: predict labels with its global model, or export a merged model.

``fedpeft predict runs/<id> --input file.jsonl`` reads one JSON object per line (its
``text``, or the run's ``data.text_field``), rebuilds the run's model from its
``config.json``, loads the latest complete checkpoint and writes one JSON line per input:
the predicted label, every label's log-likelihood and, for ``ssf_pool``, the pool entries
the instance used with their weights (chosen from the frozen model's query, exactly as
in training). :class:`Predictor` is the same as a Python API.

``fedpeft export runs/<id> --out DIR`` writes the global model merged into the base as a
plain ``transformers`` checkpoint (plus tokenizer): ``ssf``, ``ssf_pool`` with one entry,
and ``lora`` (``peft``'s ``merge_and_unload``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config import FedPeftConfig, compose
from fedpeft.data import Encoded, collate, load_task_data
from fedpeft.errors import ConfigError
from fedpeft.evaluation import label_scores, prompt_ids
from fedpeft.methods import ClientMethod, build_method, build_model
from fedpeft.models import get_tokenizer
from fedpeft.reporting import resolve_resume
from fedpeft.ssf import SSF, PoolSSF, SSFPoolModel, give_biases_for_export, merge_sites

EXPORTABLE = ("lora", "ssf", "ssf_pool (pool.entries=1)")


@dataclass(frozen=True)
class Prediction:
    """One input's predicted label, every label's score, and the pool entries it used."""

    label: str
    scores: dict[str, float]
    entries: list[int] | None = None
    entry_weights: list[float] | None = None


class Predictor:
    """A run's final global model, ready to label texts."""

    def __init__(self, cfg: FedPeftConfig, method: ClientMethod, model: nn.Module,
                 checkpoint: Path) -> None:
        self.cfg, self.method, self.model, self.checkpoint = cfg, method, model, checkpoint
        self.tokenizer = get_tokenizer(cfg.model)
        self.label_names = load_task_data(cfg.data).label_names
        if not self.label_names:
            raise ConfigError(f"run data {cfg.data.name!r} is a generation task; predict "
                              "labels classification runs only")
        model.eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, overrides: Sequence[str] = ()) -> Predictor:
        """Rebuild the run's model and load its latest checkpoint (``overrides`` are added
        to the run's own, e.g. ``model.device=cuda``)."""
        cfg = run_config(run_dir, overrides)
        _, _, checkpoint = resolve_resume(str(run_dir))
        method = build_method(cfg.method.name, cfg.method)
        model = build_model(method, cfg.model, seed=cfg.run.seed, data_cfg=cfg.data)
        method.load(model, checkpoint)
        return cls(cfg, method, model, checkpoint)

    def predict(self, texts: Sequence[str], batch_size: int = 16) -> list[Prediction]:
        """Label each text; pools also report the entries each one used."""
        table = label_scores(self.model, self.tokenizer, texts, self.label_names,
                             self.cfg.data, batch_size=batch_size)  # (N, L)
        chosen = self._entries(texts) if isinstance(self.model, SSFPoolModel) else None
        out = []
        for i, row in enumerate(table.tolist()):
            entries, weights = chosen[i] if chosen else (None, None)
            out.append(Prediction(self.label_names[int(table[i].argmax())],
                                  dict(zip(self.label_names, row, strict=True)),
                                  entries, weights))
        return out

    @torch.inference_mode()
    def _entries(self, texts: Sequence[str]) -> list[tuple[list[int], list[float]]]:
        prompts = [prompt_ids(self.tokenizer, t, self.label_names, self.cfg.data)
                   for t in texts]
        batch = collate([Encoded(p, [-100] * len(p)) for p in prompts],
                        self.tokenizer.pad_token_id)
        _, idx, weights = self.model.choose(batch["input_ids"], batch["attention_mask"],
                                            batch["labels"])
        return [(row.tolist(), [round(float(weights[b, e]), 6) for e in row])
                for b, row in enumerate(idx.cpu())]


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> FedPeftConfig:
    """The composed config of a run, from its ``config.json`` overrides."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: expected {path} (written at "
                          "the start of every run)")
    return compose([*json.loads(path.read_text())["overrides"], *overrides])


def read_texts(path: Path, field: str) -> list[str]:
    """The ``field`` of every JSON line in ``path`` (ConfigError naming a bad line)."""
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: expected a JSON object per line ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{path}:{n}: expected a string field {field!r}, found {found}")
        texts.append(row[field])
    return texts


def predict_file(run_dir: Path, input_path: Path, output: Path | None) -> list[dict[str, Any]]:
    """``fedpeft predict``: one JSON line per input (to ``output``, or returned)."""
    predictor = Predictor.from_run(run_dir)
    texts = read_texts(input_path, predictor.cfg.data.text_field)
    rows = [{"text": t, **asdict(p)} for t, p in zip(texts, predictor.predict(texts),
                                                     strict=True)]
    if output is not None:
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def export_merged(run_dir: Path, out: Path) -> Path:
    """``fedpeft export``: the run's final model merged into a plain checkpoint."""
    predictor = Predictor.from_run(run_dir)
    model = _merged(predictor.method.name, predictor.model)
    model.save_pretrained(str(out))
    predictor.tokenizer.save_pretrained(str(out))
    return out


def _merged(name: str, model: nn.Module) -> nn.Module:
    if name == "lora":
        return model.merge_and_unload()
    if name == "ssf_pool":
        model = _single_entry(model)
    if name not in ("ssf", "ssf_pool"):
        raise ConfigError(f"method {name!r} does not export a merged model; exportable: "
                          f"{', '.join(EXPORTABLE)}")
    merge_sites(model)
    give_biases_for_export(model)
    return model


@torch.no_grad()
def _single_entry(model: SSFPoolModel) -> nn.Module:
    """A one-entry pool as plain SSF sites on the base (every instance uses entry 0)."""
    if model.opts.entries != 1:
        raise ConfigError(f"ssf_pool exports only with pool.entries=1 (one entry merges); "
                          f"this run has {model.opts.entries}: use fedpeft predict instead")
    base = model.base
    for module in base.modules():
        site = module._modules.get("ssf")
        if isinstance(site, PoolSSF):
            single = SSF(site.gamma.shape[1], std=0.0, generator=torch.Generator())
            single.gamma.copy_(site.gamma[0])
            single.beta.copy_(site.beta[0])
            module._ssf_hook.remove()
            module._modules["ssf"] = single.to(site.gamma.device)
            module._ssf_hook = module.register_forward_hook(lambda m, _a, o: m.ssf(o))
    return base

