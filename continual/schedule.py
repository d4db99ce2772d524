"""The continual stream and its schedule: which task each round of a run trains on.

With ``data.task_column`` (or ``data.task_groups`` / ``data.task_files``) set,
the run's records are cut into a stream of tasks (`fedcl.continual.streams`),
oldest first, and the federation spends ``continual.rounds_per_task`` rounds on
each, in order: `task_of_round` maps a run round (1-based) to its task
(0-based), which the server sends in each round's ConfigRecord, and
`resolve_rounds` sets ``federation.rounds`` to tasks x rounds per task.
Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
import functools

from fedcl.config import Config
from fedcl.continual.streams import StreamError, Task, by_file, by_label_groups, by_period
from fedcl.session import dataset_for


def task_of_round(run_round: int, rounds_per_task: int) -> int:
    """The 0-based task a 1-based run round trains on."""
    if run_round < 1:
        raise ValueError(f"run round: got {run_round!r}, expected >= 1")
    return (run_round - 1) // rounds_per_task


def ends_task(run_round: int, rounds_per_task: int) -> bool:
    return run_round >= 1 and run_round % rounds_per_task == 0


@functools.lru_cache(maxsize=4)
def build_stream(data_cfg, seed: int) -> tuple[Task, ...]:
    """The run's tasks, oldest first, each with its slice of the global test split."""
    dataset = dataset_for(data_cfg, seed)
    if data_cfg.task_files:
        stream = by_file(dataset.train, dataset.test, data_cfg.task_file_list())
    elif data_cfg.task_groups:
        known = {r["label"] for r in dataset.train}
        unknown = [label for group in data_cfg.label_groups() for label in group if label not in known]
        if unknown:
            raise StreamError(f"data.task_groups: label(s) {unknown} are not in the data; its labels are "
                              + ", ".join(sorted(known)))
        stream = by_label_groups(dataset.train, data_cfg.label_groups(), test_records=dataset.test, seed=seed)
    else:
        stream = by_period(dataset.train, data_cfg.task_column, data_cfg.task_period,
                           test_records=dataset.test, seed=seed)
    empty = [task.name for task in stream if not task.test_records]
    if empty and data_cfg.task_files:
        raise StreamError(f"data.task_files: task(s) {', '.join(empty)} have no test records (after "
                          "data.max_test_records); give data.task_test_files or a larger data.test_fraction")
    if empty:
        where = "data.task_groups" if data_cfg.task_groups else f"data.task_column = {data_cfg.task_column!r}"
        raise StreamError(f"{where}: task(s) {', '.join(empty)} have no "
                          f"test records; use a coarser data.task_period (now {data_cfg.task_period!r}) "
                          "or more test data")
    return tuple(stream)


def resolve_rounds(config: Config) -> Config:
    """With continual learning on, federation.rounds = tasks x continual.rounds_per_task."""
    if not config.continual_on:
        return config
    rounds = len(build_stream(config.data, config.train.seed)) * config.continual.rounds_per_task
    if rounds == config.federation.rounds:
        return config
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, rounds=rounds))
