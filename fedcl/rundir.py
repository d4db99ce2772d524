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

The state files are read through `fedcl.statefile`: an empty, truncated or
wrongly shaped file raises `StateFileError` naming it, and `check()` reads
all of them, so a command refuses a damaged run folder before writing to it.
"""

from __future__ import annotations

from pathlib import Path

from fedcl import keys
from fedcl.atomic import write_json, write_text
from fedcl.statefile import StateFileError, field, read_json

CHECKPOINT_VERSION = 1
_FIX = ("fedcl changed nothing: restore the file from a backup of the run folder, or start a new "
        "run (--out) from the last good adapter (--set run.init_adapter=RUN/adapters/round-N)")


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
        return self.checkpoint()["round"]

    def checkpoint(self) -> dict:
        """The commit point, checked: its version, a round >= 0 and an adapter path."""
        path = self.checkpoint_file
        data = read_json(path, what="run checkpoint", fix=_FIX)
        version = data.get("version")
        if version != CHECKPOINT_VERSION:
            raise StateFileError(f"{path}: unsupported checkpoint version {version!r} "
                                 f"(this fedcl reads {CHECKPOINT_VERSION}); {_FIX}")
        done = field(data, "round", int, path=path, fix=_FIX)
        field(data, "adapter", str, path=path, fix=_FIX)
        if done < 0:
            raise StateFileError(f"{path}: round is {done}, expected 0 or more; {_FIX}")
        return data

    def metrics(self) -> dict:
        """metrics.json, checked: an object with a `model` object and a `rounds` list of
        objects each with an integer `round` (an absent file: no rounds yet)."""
        path = self.metrics_file
        if not path.exists():
            return {keys.MODEL: {}, keys.ROUNDS: []}
        data = read_json(path, what="run metrics", fix=_FIX)
        field(data, keys.MODEL, dict, path=path, fix=_FIX)
        for index, record in enumerate(field(data, keys.ROUNDS, list, path=path, fix=_FIX)):
            if not isinstance(record, dict):
                raise StateFileError(f"{path}: rounds[{index}] is not an object; {_FIX}")
            field(record, keys.ROUND, int, path=path, fix=_FIX, where=f"rounds[{index}]")
        return data

    def strategy_state(self) -> dict | None:
        """strategy_state.json, checked to be an object naming its strategy `kind`; None if absent."""
        path = self.strategy_state_file
        if not path.exists():
            return None
        data = read_json(path, what="server strategy state", fix=_FIX)
        field(data, "kind", str, path=path, fix=_FIX)
        return data

    def check(self) -> int:
        """Read every state file a resume needs (raising StateFileError on the first bad one):
        the checkpoint, the adapter it names, the metrics, the strategy state. Returns the
        completed rounds; writes nothing."""
        done = self.completed_rounds()
        if done:
            adapter = self.path / self.checkpoint()["adapter"]
            if not adapter.is_dir():
                raise StateFileError(f"{self.checkpoint_file}: names round {done}, but its adapter "
                                     f"folder {adapter} is missing; {_FIX}")
        rounds = self.metrics()[keys.ROUNDS]
        if done and not any(r[keys.ROUND] == done for r in rounds):
            raise StateFileError(f"{self.metrics_file}: has no record of round {done}, the round "
                                 f"{self.checkpoint_file.name} names as completed; {_FIX}")
        if done:
            self.strategy_state()
        return done

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
