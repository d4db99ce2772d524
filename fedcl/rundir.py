"""The run folder: resolved config, metrics, per-round adapters, and the resume point.

Layout::

    RUN/config.toml           the resolved configuration of the run
    RUN/metrics.json          model facts and one record per completed round
    RUN/adapters/round-N/     the global adapter after round N (PEFT format)
    RUN/checkpoint.json       the last completed round: the commit point

A round counts as completed once `checkpoint.json` names it; it is written
last and atomically, after the round's adapter and metrics. A run killed
mid-round therefore resumes from the previous round with identical state,
and a re-run of that round overwrites its partial output.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedcl import keys
from fedcl.atomic import write_json, write_text

CHECKPOINT_VERSION = 1


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.json"

    @property
    def strategy_state_file(self) -> Path:
        return self.path / "strategy_state.json"

    def adapter_dir(self, server_round: int) -> Path:
        return self.path / "adapters" / f"round-{server_round}"

    def exists(self) -> bool:
        return self.checkpoint_file.exists() or self.config_file.exists()

    def completed_rounds(self) -> int:
        if not self.checkpoint_file.exists():
            return 0
        return int(self.checkpoint()["round"])

    def checkpoint(self) -> dict:
        data = json.loads(self.checkpoint_file.read_text(encoding="utf-8"))
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.checkpoint_file}: unsupported checkpoint version {data.get('version')!r}")
        return data

    def metrics(self) -> dict:
        if not self.metrics_file.exists():
            return {keys.MODEL: {}, keys.ROUNDS: []}
        return json.loads(self.metrics_file.read_text(encoding="utf-8"))

    def start(self, config_toml: str, model_facts: dict) -> dict:
        """Create the folder for a new run, or return the metrics of the one to resume."""
        if self.checkpoint_file.exists():
            metrics = self.metrics()
            done = self.completed_rounds()
            # Drop records of a round that was written but never committed.
            metrics[keys.ROUNDS] = [r for r in metrics[keys.ROUNDS] if r[keys.ROUND] <= done]
            return metrics
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_file, config_toml)
        metrics = {keys.MODEL: model_facts, keys.ROUNDS: []}
        write_json(self.metrics_file, metrics)
        return metrics

    def commit_round(self, metrics: dict, server_round: int, strategy_state: dict) -> None:
        """Write the round's metrics, then the checkpoint that makes the round count."""
        write_json(self.metrics_file, metrics)
        write_json(self.strategy_state_file, strategy_state)
        write_json(self.checkpoint_file, {
            "version": CHECKPOINT_VERSION,
            "round": server_round,
            "adapter": str(self.adapter_dir(server_round).relative_to(self.path)),
        })
