"""A node's lifetime privacy ledger: what its data has paid, across every run.

The ledger lives in the node's own state folder (``privacy-ledger.json``), not
in a run folder, so epsilon keeps growing across rounds, resumed runs and new
runs on the same data. It holds

- ``history``: the accountant's input, ``[noise_multiplier, sample_rate, steps]``
  triples, from which epsilon is recomputed from scratch (any accountant);
- ``entries``: one per released update (run, round, steps, noise, sample rate,
  delta, epsilon after), for people to read (`fedcl privacy STATE_DIR`).

A round is charged when its update is about to be released: the entry is
written (atomically) before the client replies. A round re-run after a crash
trains again and releases a second update, so it is charged again: a second
release of data-dependent output does cost privacy. Never charging the same
(run, round) twice would undercount exactly then.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedcl.atomic import write_text
from fedcl.privacy.accounting import History, epsilon

LEDGER_FILE = "privacy-ledger.json"
LEDGER_KIND = "fedcl.PrivacyLedger"
LEDGER_VERSION = 1


class LedgerError(ValueError):
    """A ledger file or state that cannot be used; the message names it."""


class PrivacyLedger:
    def __init__(self) -> None:
        self.history: History = []
        self.entries: list[dict] = []

    # -- accounting --------------------------------------------------------
    def epsilon(self, *, delta: float, accountant: str) -> float:
        return epsilon(self.history, delta=delta, accountant=accountant)

    def epsilon_after(self, *, steps: int, noise_multiplier: float, sample_rate: float,
                      delta: float, accountant: str) -> float:
        """What epsilon would be after `steps` more steps (nothing is recorded)."""
        return epsilon(self._extended(steps, noise_multiplier, sample_rate), delta=delta,
                       accountant=accountant)

    def record(self, *, run: str, server_round: int, steps: int, noise_multiplier: float,
               sample_rate: float, delta: float, accountant: str) -> float:
        """Charge `steps` DP-SGD steps released in (run, round); return epsilon after."""
        if steps < 0:
            raise LedgerError(f"steps: got {steps}, expected a non-negative integer")
        self.history = self._extended(steps, noise_multiplier, sample_rate)
        eps = self.epsilon(delta=delta, accountant=accountant)
        self.entries.append({
            "run": run, "round": int(server_round), "steps": int(steps),
            "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
            "delta": float(delta), "accountant": accountant, "epsilon": eps,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        return eps

    def _extended(self, steps: int, noise: float, rate: float) -> History:
        # Consecutive steps with the same parameters merge into one triple, as
        # Opacus' own accountants do: same epsilon, shorter history.
        history = [tuple(h) for h in self.history]
        if steps == 0:
            return history
        if history and history[-1][0] == noise and history[-1][1] == rate:
            history[-1] = (noise, rate, history[-1][2] + steps)
        else:
            history.append((float(noise), float(rate), int(steps)))
        return history

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": LEDGER_KIND, "version": LEDGER_VERSION,
                "history": [list(h) for h in self.history], "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != LEDGER_KIND:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise LedgerError(f"privacy ledger: kind {found!r}, expected {LEDGER_KIND!r}")
        if state.get("version") != LEDGER_VERSION:
            raise LedgerError(f"privacy ledger: version {state.get('version')!r}, "
                              f"expected {LEDGER_VERSION}")
        history, entries = state.get("history"), state.get("entries")
        if not isinstance(history, list) or not isinstance(entries, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 3 for h in history):
            raise LedgerError("privacy ledger: history must be [noise, sample_rate, steps] "
                              "triples and entries a list")
        self.history = [(float(n), float(q), int(s)) for n, q, s in history]
        self.entries = [dict(e) for e in entries]

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        """The ledger at `path`, or an empty one if there is none yet."""
        ledger, path = cls(), Path(path)
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise LedgerError(f"{path}: not a readable privacy ledger: {err}") from None
            try:
                ledger.load_state_dict(state)
            except LedgerError as err:
                raise LedgerError(f"{path}: {err}") from None
        return ledger

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.state_dict(), indent=1) + "\n")
