"""The Flower ServerApp: Flower's own round loop with fedcl's strategy and checkpoints.

Each round: the strategy sends the global adapter to the sampled clients and
aggregates their replies; then `evaluate_fn` scores the new global adapter on
the global test split, saves it in PEFT format and commits the round to the
run folder. A run folder that already holds completed rounds is resumed from
its last checkpoint.

With continual learning on (data.task_column), the run has tasks x
continual.rounds_per_task rounds; each round's ConfigRecord names its task,
and `evaluate_fn` adds the zero-shot accuracies (before round 1) and one row
of the accuracy matrix per finished task to metrics.json's ``continual``
section, committed with the round (see fedcl/continual/tracker.py).
"""

from __future__ import annotations

import logging
import time

import fedcl  # noqa: F401  (sets offline defaults before flwr loads)
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedcl import accelerator, keys
from fedcl.config import ConfigError, from_run_config
from fedcl.continual.schedule import resolve_rounds
from fedcl.continual.tracker import ServerContinual
from fedcl.federation.messages import arrays_to_state, state_to_arrays
from fedcl.federation.reply_polling import polling
from fedcl.privacy import report as privacy_report
from fedcl.server.progress import RoundProgress
from fedcl.rundir import RunDir
from fedcl.session import GlobalEvaluator
from fedcl.strategies import build_strategy

logger = logging.getLogger("fedcl.server")
app = ServerApp()


def numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = resolve_rounds(from_run_config(dict(context.run_config)))
    if not config.run.out_dir:
        raise ConfigError("run.out_dir: the ServerApp needs a run folder to write to")
    run_dir = RunDir(config.run.out_dir)
    evaluator = GlobalEvaluator(config)
    metrics = run_dir.start(config.to_toml(), {
        "name": config.model.name, "base_bytes": evaluator.base_bytes(),
        "adapter_bytes": sum(t.numel() * 4 for t in evaluator.initial_state.values()),
        # Where the server evaluates (clients compute on the same model.device, or their node's).
        **accelerator.device_facts(evaluator.shared.model, config.model),
    })
    if config.privacy.enabled:
        metrics[keys.PRIVACY] = {**metrics.get(keys.PRIVACY, {}), **privacy_report.run_section(config)}
    done = run_dir.completed_rounds()
    continual = ServerContinual(config, evaluator, metrics, done) if config.continual_on else None
    remaining = config.federation.rounds - done
    if remaining <= 0:
        logger.info("run %s already has %d of %d rounds", run_dir.path, done, config.federation.rounds)
        return
    state = evaluator.initial_state
    if config.run.init_adapter and not done:  # e.g. a continual update from a registry version
        state = evaluator.load_saved(config.run.init_adapter)
        logger.info("starting from adapter %s", config.run.init_adapter)
    if done:
        state = _load_round(evaluator, run_dir, done)
        logger.info("resuming %s after round %d", run_dir.path, done)
    strategy = build_strategy(config, round_offset=done, reply_template=evaluator.shared.initial_state)
    saved = run_dir.strategy_state() if done else None
    if saved is not None:  # moments, momentum: resume exactly
        strategy.load_state_dict(saved)
    if continual is not None:
        strategy.set_round_config(continual.round_config)
    progress = RoundProgress(config.federation.rounds, done)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        run_round = done + server_round
        started = time.perf_counter()
        if server_round == 0:
            if done == 0:
                metrics[keys.INITIAL_EVAL] = evaluator.evaluate(arrays_to_state(arrays),
                                                                progress=progress.evaluating(0))
                if continual is not None:
                    continual.before_round_one(arrays_to_state(arrays))
                progress.initial(metrics[keys.INITIAL_EVAL])
            return None
        state = arrays_to_state(arrays)
        result = evaluator.evaluate(state, progress=progress.evaluating(run_round))
        evaluator.save(state, run_dir.adapter_dir(run_round))
        record = strategy.records.pop(run_round, {keys.ROUND: run_round})
        record[keys.EVAL] = result
        if continual is not None:  # the matrix row is committed with the round
            continual.after_round(run_round, state, record)
        if keys.PRIVACY in metrics:
            privacy_report.note_clients(metrics[keys.PRIVACY], record.get(keys.CLIENTS, []),
                                        server_round=run_round)
        record[keys.SERVER_EVAL_SECONDS] = time.perf_counter() - started
        if keys.STARTED_AT in record:
            record[keys.ROUND_SECONDS] = time.time() - record.pop(keys.STARTED_AT)
        metrics[keys.ROUNDS].append(record)
        run_dir.commit_round(metrics, run_round, strategy.state_dict())
        progress.round_done(record)
        return MetricRecord(numeric(result))

    strategy.start(grid=polling(grid), initial_arrays=state_to_arrays(state), num_rounds=remaining,
                   timeout=config.federation.timeout, evaluate_fn=evaluate_fn)
    progress.close()


def _load_round(evaluator: GlobalEvaluator, run_dir: RunDir, server_round: int) -> dict:
    """The global adapter state saved after `server_round`, in the evaluator's naming."""
    return evaluator.load_saved(run_dir.adapter_dir(server_round))
