"""Flower ServerApp: compose config, build the method's global state and the strategy,
run the rounds, evaluate the global model on the held-out split after every round,
checkpoint it, and write ``runs/<run-id>/metrics.jsonl``.

The same app serves ``flwr run .`` simulations and SuperLink/SuperNode deployments.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpeft import wire
from fedpeft.compression import build_compressor
from fedpeft.config import FedPeftConfig, load_components
from fedpeft.errors import BudgetExhausted, RunFailed
from fedpeft.preflight import preflight
from fedpeft.reporting import RunDir, resolve_resume
from fedpeft.runstatus import StatusWriter
from fedpeft.schema import to_dict
from server.state import GlobalModel
from server.watchdog import WatchedGrid

log = logging.getLogger("flwr")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the grid of connected SuperNodes."""
    cfg = preflight(context.run_config.get("overrides", ""),
                    context.run_config.get("config-dir") or None).cfg
    run, start_round = _open_run(cfg)
    status = StatusWriter(run)
    status.install_signal_handlers()
    status.set("running", start_round=start_round)
    status.start_heartbeat()
    try:
        serve(grid, cfg, run, start_round)
    except BudgetExhausted as exc:  # a clean end: every client spent its privacy budget
        log.warning("fedpeft: %s; stopping", exc)
        status.set("completed", rounds=_rounds_done(run), stopped=str(exc))
        return
    except RunFailed as exc:  # an expected end: nothing trained, stalled, no nodes
        log.error("fedpeft: run failed: %s", exc)
        status.set("failed", error=str(exc), reason=type(exc).__name__,
                   first_client_error=getattr(exc, "first_error", None))
        return
    except BaseException as exc:  # after a signal the status already names it
        status.set("failed", error=_describe(exc), reason=type(exc).__name__)
        raise
    status.set("completed", rounds=cfg.run.num_rounds)


def _describe(exc: BaseException) -> str:
    """An error text; a bare ``SystemExit`` (Flower's exit path) says what it was."""
    if isinstance(exc, SystemExit):
        return f"the server process exited (SystemExit with code {exc.code!r}) mid-run"
    return f"{type(exc).__name__}: {exc}"


def _open_run(cfg: FedPeftConfig) -> tuple[RunDir, int]:
    if cfg.run.resume:
        run, last_round, _ = resolve_resume(cfg.run.resume)
        return run, last_round
    tag = f"{cfg.method.name}-{cfg.strategy.name}"
    run = RunDir.create(cfg.run.output_dir, cfg.run.run_id, tag)
    run.write_json("config.json", {"overrides": list(cfg.overrides), "config": to_dict(cfg)})
    return run, 0


def serve(grid: Grid, cfg: FedPeftConfig, run: RunDir, start_round: int) -> None:
    """Run rounds ``start_round+1 .. run.num_rounds`` with the configured strategy."""
    load_components()
    remaining = cfg.run.num_rounds - start_round
    if remaining <= 0:
        log.info("fedpeft: run already has %d rounds; nothing to do", start_round)
        return
    state = GlobalModel(cfg, run, start_round)
    strategy = state.strategy = _strategy(cfg, state, start_round)
    grid = WatchedGrid(grid, stall_timeout_s=cfg.run.stall_timeout_s,
                       node_wait_s=cfg.run.node_wait_s, nodes_needed=_nodes_needed(cfg),
                       partition_of=lambda node: _partition_of(state.strategy, node))
    state.arrivals = grid.arrivals
    log.info("fedpeft: run dir %s, rounds %d..%d", run.path, start_round + 1,
             cfg.run.num_rounds)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=wire.to_arrayrecord(state.initial_state()),
            num_rounds=remaining,
            timeout=cfg.run.round_timeout_s,
            train_config=ConfigRecord({"seed": cfg.run.seed}),
            evaluate_fn=state.end_of_round,
        )
    finally:
        state.log_summary()


def _strategy(cfg: FedPeftConfig, state: GlobalModel, start_round: int) -> Any:
    """The configured strategy, bound to the run: replay history on resume; for dense
    strategies the decoding wrapper with its screen, codec, downlink and privacy; the
    privacy budget's admission rule; and the observer when ``capture.rounds`` is set."""
    from strategies import STRATEGIES, build_strategy
    from strategies.decoding import DecodingStrategy
    from strategies.downlink import Downlink
    from strategies.observer import Observer

    strategy = build_strategy(cfg.strategy.name, cfg.strategy.params)
    if hasattr(strategy, "bind_method"):  # replay strategies (FedKSeed, Ferret)
        strategy.bind_method(state.method)
        if start_round:
            strategy.load(state.checkpoint)
            strategy.round_offset = start_round
    if STRATEGIES.get(cfg.strategy.name).wrap:
        strategy = DecodingStrategy(strategy, round_offset=start_round, name=cfg.strategy.name,
                                    screen=cfg.screen)
    if cfg.compression.name != "identity":
        strategy.compressor = build_compressor(cfg.compression)
    if cfg.compression.downlink:
        strategy.downlink = Downlink(build_compressor(cfg.compression))
    strategy.privacy_required = state.privacy.mechanism.level == "sample"
    if state.privacy.mechanism.level == "client":
        strategy.enable_client_dp(cfg.privacy)
    strategy.admit = lambda nodes, rnd: state.privacy.admit(
        nodes, lambda node: _partition_of(strategy, str(node)), rnd)
    if cfg.secagg.enabled:
        from strategies.secagg import SecAggServer

        strategy.secagg = SecAggServer(cfg.secagg)
    if cfg.capture.rounds:
        strategy.observer = Observer(cfg.capture, state.run.path)
        log.info("fedpeft: capturing what the server observes in rounds %s under %s",
                 sorted(cfg.capture.rounds), strategy.observer.root)
    return strategy


def _rounds_done(run: RunDir) -> int:
    return max((r["round"] for r in run.records()), default=0)


def _partition_of(strategy: object, node: str) -> int | None:
    """Partition id a node reported (None before it ever replied); dense and replay
    strategies both keep a ``NodePartitions`` map."""
    partitions = getattr(strategy, "partitions", None)
    return partitions.get(node) if partitions is not None else None


def _nodes_needed(cfg: FedPeftConfig) -> int:
    from strategies import STRATEGIES
    from strategies.options import effective, nodes_needed

    opts = effective(STRATEGIES.get(cfg.strategy.name).factory, cfg.strategy.params)
    return nodes_needed(opts, cfg.sim.num_clients)
