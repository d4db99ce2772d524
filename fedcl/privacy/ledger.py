"""A node's lifetime privacy ledger: what its data has paid, across every run.

The ledger lives in the node's own state folder (``privacy-ledger.json``), not
in a run folder, so epsilon keeps growing across rounds, resumed runs and new
runs on the same data. It holds

- ``history``: the accountant's input, ``[noise_multiplier, sample_rate, steps]``
  triples, from which epsilon is recomputed from scratch (any accountant);
- ``entries``: one per released update (run, round, steps, noise, sample rate,
  delta, epsilon after), for people to read (`fedcl privacy STATE_DIR`).

- ``charged``: how many entries and steps the file holds, a cross-check.

A ledger file is checked before anything is computed from it: every entry's
fields (finite numbers, steps a whole number >= 0, noise > 0, sample rate in
(0, 1], delta in (0, 1), a known accountant), the history against the one the
entries give, ``charged`` against the entries, and the last entry's epsilon
against the epsilon recomputed from the history. A ledger that fails is
refused with the file, the entry and the field; nothing is written. What a
file alone cannot show: a ledger emptied or rolled back as a whole
(history, entries and ``charged`` together), or a deleted file.

A round is charged when its update is about to be released: the entry is
written (atomically) before the client replies. A round re-run after a crash
trains again and releases a second update, so it is charged again: a second
release of data-dependent output does cost privacy. Never charging the same
(run, round) twice would undercount exactly then. What is charged once is a
message: an entry records the Flower message id it answered, and the same
message handled again (its first reply never left the node: the node's
worker died in between) is not charged again.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from pathlib import Path
from typing import Any, get_args

from fedcl.atomic import write_text
from fedcl.config import AccountantKind
from fedcl.privacy.accounting import History, epsilon
from fedcl.statefile import read_json

LEDGER_FILE = "privacy-ledger.json"
LEDGER_KIND = "fedcl.PrivacyLedger"
LEDGER_VERSION = 1


ACCOUNTANTS = get_args(AccountantKind)
_FIX = ("refusing to train on a ledger that may undercount: restore the file from a backup; "
        "fedcl changed nothing")


class LedgerError(ValueError):
    """A ledger file or state that cannot be used; the message names it."""


def check_parameters(*, steps: Any, noise_multiplier: Any, sample_rate: Any, delta: Any = 0.5,
                     accountant: Any = ACCOUNTANTS[0]) -> str | None:
    """What is wrong with one charge's parameters ("field: got X, expected Y"), or None."""
    def number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        return f"steps: got {steps!r}, expected a whole number >= 0"
    if not number(noise_multiplier) or noise_multiplier <= 0:
        return f"noise_multiplier: got {noise_multiplier!r}, expected a finite number > 0"
    if not number(sample_rate) or not 0 < sample_rate <= 1:
        return f"sample_rate: got {sample_rate!r}, expected a number in (0, 1]"
    if not number(delta) or not 0 < delta < 1:
        return f"delta: got {delta!r}, expected a number in (0, 1)"
    if accountant not in ACCOUNTANTS:
        return f"accountant: got {accountant!r}, expected one of {', '.join(ACCOUNTANTS)}"
    return None


class PrivacyLedger:
    def __init__(self) -> None:
        self.history: History = []
        self.entries: list[dict] = []
        self._computed: dict[tuple, float] = {}  # the check at load computes what check() asks next

    # -- accounting --------------------------------------------------------
    def epsilon(self, *, delta: float, accountant: str) -> float:
        key = (tuple(self.history), delta, accountant)
        if key not in self._computed:
            self._computed = {key: epsilon(self.history, delta=delta, accountant=accountant)}
        return self._computed[key]

    def epsilon_after(self, *, steps: int, noise_multiplier: float, sample_rate: float,
                      delta: float, accountant: str) -> float:
        """What epsilon would be after `steps` more steps (nothing is recorded)."""
        return epsilon(self._extended(steps, noise_multiplier, sample_rate), delta=delta,
                       accountant=accountant)

    def record(self, *, run: str, server_round: int, steps: int, noise_multiplier: float,
               sample_rate: float, delta: float, accountant: str, message: str = "") -> float:
        """Charge `steps` DP-SGD steps released in (run, round); return epsilon after.
        `message`: the Flower message the update answers, kept so it is charged once."""
        problem = check_parameters(steps=steps, noise_multiplier=noise_multiplier,
                                   sample_rate=sample_rate, delta=delta, accountant=accountant)
        if problem:
            raise LedgerError(f"privacy ledger: cannot charge round {server_round}: {problem}")
        self.history = self._extended(steps, noise_multiplier, sample_rate)
        eps = self.epsilon(delta=delta, accountant=accountant)
        self.entries.append({
            "run": run, "round": int(server_round), "steps": int(steps),
            "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
            "delta": float(delta), "accountant": accountant, "epsilon": eps,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"message": str(message)} if message else {}),
        })
        return eps

    def run_epsilon(self, run: str, *, delta: float, accountant: str) -> float:
        """Epsilon of run `run`'s entries alone: what that run cost, whatever this ledger
        held before it (the lifetime `epsilon` composes every run's)."""
        history: History = []
        for entry in self.entries:
            if entry["run"] == run:
                history = _merged(history, entry["steps"], entry["noise_multiplier"], entry["sample_rate"])
        return epsilon(history, delta=delta, accountant=accountant) if history else 0.0

    def charged_for(self, message: str) -> dict | None:
        """The entry that charged Flower message `message`, or None."""
        return next((e for e in self.entries if message and e.get("message") == message), None)

    def _extended(self, steps: int, noise: float, rate: float) -> History:
        return _merged(self.history, steps, noise, rate)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": LEDGER_KIND, "version": LEDGER_VERSION,
                "history": [list(h) for h in self.history], "entries": [dict(e) for e in self.entries],
                "charged": {"entries": len(self.entries), "steps": sum(e["steps"] for e in self.entries)}}

    def load_state_dict(self, state: dict) -> None:
        """Load a state after checking it through and through (see the module docstring)."""
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
                              f"triples and entries a list; {_FIX}")
        for index, (noise, rate, steps) in enumerate(history):
            problem = check_parameters(steps=steps, noise_multiplier=noise, sample_rate=rate)
            if problem:
                raise LedgerError(f"privacy ledger: history[{index}]: {problem}; {_FIX}")
        for index, entry in enumerate(entries):
            _check_entry(index, entry)
        # Compared merged, as `_extended` merges: a ledger written before merging still matches.
        replayed, loaded = PrivacyLedger(), PrivacyLedger()
        for entry in entries:
            replayed.history = replayed._extended(int(entry["steps"]), float(entry["noise_multiplier"]),
                                                  float(entry["sample_rate"]))
        for noise, rate, steps in history:
            loaded.history = loaded._extended(int(steps), float(noise), float(rate))
        if loaded.history != replayed.history:
            raise LedgerError(f"privacy ledger: history {_short(loaded.history)} differs from the "
                              f"{len(entries)} entries, which charge {_short(replayed.history)}; {_FIX}")
        _check_charged(state.get("charged"), entries)
        if entries:  # each entry records the lifetime epsilon after it: the last one, all of it
            last = entries[-1]
            recorded = float(last["epsilon"])
            now = loaded.epsilon(delta=last["delta"], accountant=last["accountant"])
            if not math.isclose(now, recorded, rel_tol=1e-6, abs_tol=1e-9):
                raise LedgerError(f"privacy ledger: entries[{len(entries) - 1}].epsilon is {recorded!r}, "
                                  f"but the history recomputes to {now!r}; {_FIX}")
        self.history, self._computed = loaded.history, loaded._computed
        self.entries = [dict(e) for e in entries]

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        """The ledger at `path`, checked, or an empty one if there is none yet."""
        ledger, path = cls(), Path(path)
        if path.exists():
            state = read_json(path, what="privacy ledger", fix=_FIX, error=LedgerError)
            try:
                ledger.load_state_dict(state)
            except LedgerError as err:
                raise LedgerError(f"{path}: {err}") from None
        return ledger

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.state_dict(), indent=1) + "\n")


_ENTRY_FIELDS = ("run", "round", "steps", "noise_multiplier", "sample_rate", "delta", "accountant",
                 "epsilon")


def _merged(history: History, steps: int, noise: float, rate: float) -> History:
    """`history` with `steps` more steps. Consecutive steps with the same parameters merge
    into one triple, as Opacus' own accountants do: same epsilon, shorter history."""
    history = [tuple(h) for h in history]
    if steps == 0:
        return history
    if history and history[-1][0] == noise and history[-1][1] == rate:
        history[-1] = (noise, rate, history[-1][2] + steps)
    else:
        history.append((float(noise), float(rate), int(steps)))
    return history


def _check_entry(index: int, entry: Any) -> None:
    where = f"entries[{index}]"
    if not isinstance(entry, dict):
        raise LedgerError(f"privacy ledger: {where} is not an object; {_FIX}")
    missing = [key for key in _ENTRY_FIELDS if key not in entry]
    if missing:
        raise LedgerError(f"privacy ledger: {where} has no {', '.join(missing)}; {_FIX}")
    problem = check_parameters(steps=entry["steps"], noise_multiplier=entry["noise_multiplier"],
                               sample_rate=entry["sample_rate"], delta=entry["delta"],
                               accountant=entry["accountant"])
    eps = entry["epsilon"]
    if problem is None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)
                            or not math.isfinite(eps) or eps < 0):
        problem = f"epsilon: got {eps!r}, expected a finite number >= 0"
    if problem is None and (not isinstance(entry["round"], int) or isinstance(entry["round"], bool)):
        problem = f"round: got {entry['round']!r}, expected a whole number"
    if problem is None and not isinstance(entry["run"], str):
        problem = f"run: got {entry['run']!r}, expected a string"
    if problem:
        raise LedgerError(f"privacy ledger: {where}.{problem}; {_FIX}")


def _check_charged(charged: Any, entries: list[dict]) -> None:
    """The file's own count of what it charged (absent in ledgers written before it existed)."""
    if charged is None:
        return
    expected = {"entries": len(entries), "steps": sum(e["steps"] for e in entries)}
    if charged != expected:
        raise LedgerError(f"privacy ledger: charged is {charged!r}, but the entries hold {expected!r}: "
                          f"entries were removed or edited; {_FIX}")


def _short(history: History) -> str:
    text = repr([list(h) for h in history])
    return text if len(text) <= 80 else text[:77] + "..."
