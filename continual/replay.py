"""Experience replay: a reservoir of past records (storage) and a batch mixer (use).

`ReservoirBuffer` decides *what* is kept: a uniform sample of every record it
was ever given (Vitter's Algorithm R), or, with ``balanced_by_class=True``, one
uniform reservoir per label with equal quotas (capacity // classes, the
remainder going to the first labels in sorted order). `mix_batches` decides
*how* kept records are used: it appends replayed records to each local batch so
that a set fraction of the mixed batch is replay.

Records never leave the client: `save`/`load` write the buffer as JSON into the
node's own state folder, atomically. The random generator's state is part of
the saved state, so a restored buffer continues exactly as the original would.

Under DP-SGD, do not mix replay into Poisson batches (replayed records would be
sampled more often than the accountant assumes); train on
``current records + buffer.sample(k)`` as one dataset instead (see `replay_pool`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fedcl.atomic import write_bytes
from fedcl.continual.state import StateError, check_same, check_state

KIND = "fedcl.continual.reservoir_buffer"
VERSION = 1


class ReservoirBuffer:
    """A bounded, uniformly sampled memory of past records (optionally per class)."""

    def __init__(self, capacity: int, seed: int, balanced_by_class: bool = False):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: got {capacity!r}, expected a positive integer")
        self.capacity = capacity
        self.balanced_by_class = bool(balanced_by_class)
        self._rng = np.random.default_rng(seed & 0xFFFF_FFFF_FFFF_FFFF)
        # label -> (records seen, kept records); a single "" pool when not balanced
        self._seen: dict[str, int] = {}
        self._items: dict[str, list[dict]] = {}

    # -- storage policy --------------------------------------------------------
    def add(self, records: Iterable[dict]) -> None:
        """Offer every record to the reservoir, in order."""
        records = list(records)
        if not self.balanced_by_class:
            self._offer("", records, self.capacity)
            return
        for index, record in enumerate(records):
            if "label" not in record:
                raise ValueError(f"record {index} has no label; balanced_by_class needs labelled records")
            label = record["label"]
            if label not in self._items:
                self._items[label], self._seen[label] = [], 0
                self._shrink_to_quotas()
            self._offer(label, [record], self.quotas()[label])

    def _offer(self, key: str, records: list[dict], quota: int) -> None:
        """Algorithm R: the n-th record offered replaces a random slot with probability quota/n."""
        items = self._items.setdefault(key, [])
        seen = self._seen.get(key, 0)
        fill = min(max(quota - len(items), 0), len(records))
        items.extend(records[:fill])
        rest = records[fill:]
        if rest:  # one vectorised draw: j_n uniform on [0, n) for n = seen+fill+1, ...
            highs = np.arange(seen + fill + 1, seen + len(records) + 1)
            slots = self._rng.integers(0, highs)
            for record, slot in zip(rest, slots):
                if slot < quota:
                    items[slot] = record
        self._seen[key] = seen + len(records)

    def quotas(self) -> dict[str, int]:
        """Slots per label: equal shares of the capacity, remainder to the first labels (sorted)."""
        if not self.balanced_by_class:
            return {"": self.capacity}
        labels = sorted(self._items)
        base, extra = divmod(self.capacity, max(len(labels), 1))
        return {label: base + (1 if i < extra else 0) for i, label in enumerate(labels)}

    def _shrink_to_quotas(self) -> None:
        # Dropping random members of a uniform sample leaves a uniform sample.
        for label, quota in self.quotas().items():
            items = self._items[label]
            if len(items) > quota:
                keep = sorted(self._rng.choice(len(items), size=quota, replace=False))
                self._items[label] = [items[i] for i in keep]

    # -- reading ---------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(items) for items in self._items.values())

    def records(self) -> list[dict]:
        """Every kept record (grouped by label when balanced)."""
        return [r for key in sorted(self._items) for r in self._items[key]]

    def seen(self) -> int:
        return sum(self._seen.values())

    def sample(self, k: int, rng: np.random.Generator) -> list[dict]:
        """min(k, len(self)) distinct kept records, drawn uniformly with `rng`."""
        pool = self.records()
        k = min(max(int(k), 0), len(pool))
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "capacity": self.capacity,
                "balanced_by_class": self.balanced_by_class,
                "pools": {key: {"seen": self._seen[key], "items": list(self._items[key])}
                          for key in sorted(self._items)},
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict, source: str = "replay buffer state") -> None:
        check_state(state, KIND, VERSION, source)
        check_same(source, "capacity", state["capacity"], self.capacity)
        check_same(source, "balanced_by_class", state["balanced_by_class"], self.balanced_by_class)
        pools = state["pools"]
        if sum(len(p["items"]) for p in pools.values()) > self.capacity:
            raise StateError(f"{source}: holds more records than the capacity {self.capacity}")
        self._seen = {key: int(p["seen"]) for key, p in pools.items()}
        self._items = {key: list(p["items"]) for key, p in pools.items()}
        self._rng.bit_generator.state = state["rng"]

    def save(self, path: str | Path) -> Path:
        """Write the state as JSON to `path` (in the node's state folder), atomically."""
        data = json.dumps(self.state_dict(), ensure_ascii=False, sort_keys=True)
        return write_bytes(path, data.encode("utf-8"))

    def load(self, path: str | Path) -> None:
        """Restore the state saved at `path`; refuses a state of another kind or setting."""
        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise StateError(f"{path}: not a replay buffer state ({err.msg})") from None
        self.load_state_dict(state, source=str(path))


# -- mixing ------------------------------------------------------------------------

def replay_count(batch_size: int, ratio: float) -> int:
    """Replayed records to append to a batch of `batch_size` so they form `ratio` of the mix."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: got {ratio!r}, expected a float in [0, 1)")
    return round(batch_size * ratio / (1.0 - ratio))


def mix_batches(batches: Iterable[list[dict]], buffer: ReservoirBuffer, ratio: float,
                rng: np.random.Generator) -> Iterator[list[dict]]:
    """Each batch followed by `replay_count(len(batch), ratio)` records drawn from `buffer`.

    ratio 0.5 doubles each batch with replay (as Avalanche's ReplayPlugin);
    an empty buffer leaves batches unchanged, a small one gives what it holds.
    """
    replay_count(1, ratio)  # validates before the first batch is drawn
    for batch in batches:
        batch = list(batch)
        extra = buffer.sample(replay_count(len(batch), ratio), rng) if len(buffer) else []
        yield batch + extra


def replay_pool(records: list[dict], buffer: ReservoirBuffer, k: int,
                rng: np.random.Generator) -> list[dict]:
    """`records` plus up to `k` buffered ones, as one training set (the DP-compatible way to replay)."""
    return list(records) + buffer.sample(k, rng)
