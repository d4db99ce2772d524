"""The server's side of continual learning: the accuracy matrix and its summaries.

`ServerContinual` scores the global adapter on every task's test split: zero-shot
before round 1, then one row of the accuracy matrix after each task's last
round, and keeps metrics.json's ``continual`` section (`continual_section`,
figures from `fedcl.continual.metrics`) inside the run's metrics dict, so each
round's commit carries it. Nothing here imports Flower.
"""

from __future__ import annotations

import logging
import math

from fedcl import keys
from fedcl.config import Config, ConfigError, avalanche_plugin
from fedcl.continual import metrics as clm
from fedcl.continual.schedule import build_stream, ends_task, task_of_round

logger = logging.getLogger("fedcl.continual")

DEFINITIONS = {
    "accuracy_matrix": "R[k][j]: global accuracy on task j's test split after the last round of task k",
    "zero_shot": "b[j]: accuracy on task j before round 1",
    "average_accuracy": "mean_j<=K-1 R[K-1][j]",
    "bwt": "mean_j<K-1 R[K-1][j] - R[j][j] (backward transfer)",
    "forgetting": "mean_j<K-1 max_k<K-1 R[k][j] - R[K-1][j]",
    "fwt": "mean_1<=j<=K-1 R[j-1][j] - b[j] (forward transfer)",
}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def continual_section(config: Config, names: list[str], matrix: list[list[float]],
                      zero_shot: list[float] | None) -> dict:
    """metrics.json's ``continual`` section from the rows so far (figures None while undefined)."""
    section = {"strategy": config.continual.strategy, "rounds_per_task": config.continual.rounds_per_task,
               "task_column": config.data.task_column, "task_period": config.data.task_period,
               "task_groups": config.data.task_groups, "task_files": config.data.task_file_list(),
               "tasks": list(names), "accuracy_matrix": [list(r) for r in matrix],
               "zero_shot": list(zero_shot) if zero_shot is not None else None,
               "average_accuracy": None, "bwt": None, "forgetting": None, "fwt": None,
               "definitions": DEFINITIONS}
    if matrix:
        section.update(average_accuracy=clm.average_accuracy(matrix), bwt=_finite(clm.backward_transfer(matrix)),
                       forgetting=_finite(clm.forgetting(matrix)),
                       fwt=_finite(clm.forward_transfer(matrix, zero_shot)) if zero_shot else None)
    if avalanche_plugin(config.continual.strategy) is not None and len(matrix) >= 2:
        # The same matrix through Avalanche's own metric classes, next to ours: its forgetting
        # is "right after training minus latest", ours the maximum-based one.
        from fedcl.continual.avalanche_bridge import avalanche_transfer

        section["avalanche_metrics"] = avalanche_transfer(matrix)
    return section


class ServerContinual:
    """The server's accuracy matrix, kept inside the run's metrics dict (so commits carry it)."""

    def __init__(self, config: Config, evaluator, metrics: dict, done: int):
        self.config, self.evaluator, self.metrics = config, evaluator, metrics
        if config.data.task != "classification":
            raise ConfigError(f"data.task_column: continual learning reports accuracies, so it needs "
                              f"data.task = \"classification\" (got {config.data.task!r})")
        self.stream = build_stream(config.data, config.train.seed)
        self.names = [t.name for t in self.stream]
        old = metrics.get(keys.CONTINUAL) or {}
        if old and old.get("tasks") != self.names:
            raise ConfigError(f"metrics.json: the run's continual tasks {old.get('tasks')} differ from "
                              f"this stream's {self.names}")
        # Rows of tasks finished by the last committed round only (a crash may leave one more).
        rows = (old.get("accuracy_matrix") or [])[: done // config.continual.rounds_per_task]
        self.matrix, self.zero_shot = rows, old.get("zero_shot")
        self._write()

    def round_config(self, run_round: int) -> dict:
        rpt = self.config.continual.rounds_per_task
        # TASK_END: clients send their importance with this round's update (federated importance)
        return {keys.TASK: task_of_round(run_round, rpt), keys.TASK_END: int(ends_task(run_round, rpt))}

    def accuracies(self, state: dict) -> list[float]:
        out = []
        for task in self.stream:
            result = self.evaluator.evaluate_records(state, task.test_records)
            out.append(float(result[keys.ACCURACY]))
        return out

    def before_round_one(self, state: dict) -> None:
        self.zero_shot = self.accuracies(state)
        self._write()

    def after_round(self, run_round: int, state: dict, record: dict) -> None:
        rpt = self.config.continual.rounds_per_task
        record[keys.ROUND_TASK] = task_of_round(run_round, rpt)
        if ends_task(run_round, rpt):
            self.matrix = self.matrix[: run_round // rpt - 1] + [self.accuracies(state)]
            record[keys.TASK_ACCURACIES] = self.matrix[-1]
            self._write()
            logger.info("task %s done | accuracy %s", self.names[len(self.matrix) - 1],
                        " ".join(f"{a:.3f}" for a in self.matrix[-1]))

    def _write(self) -> None:
        self.metrics[keys.CONTINUAL] = continual_section(self.config, self.names, self.matrix, self.zero_shot)
