"""A client's privacy guard: the plan, the budget check and the ledger charge.

The ClientApp uses it in three moves per round::

    guard = client_privacy(config, client_id, num_records, state_dir)  # plan: once
    verdict = guard.check()              # before training: refuse past the cap
    eps = guard.charge(run=..., server_round=..., steps=...)  # before replying

The ledger is re-read from disk at every check and charge: a simulated client
may run in a different worker process each round, so no in-memory copy can be
trusted to be the latest.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedcl.config import Config
from fedcl.privacy.accounting import DPPlan, sample_plan
from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger

logger = logging.getLogger("fedcl.privacy")

# Test hook: exit the process right after the ledger is written, before the
# reply leaves (how a node killed at the worst moment behaves).
EXIT_AFTER_CHARGE_ENV = "FEDCL_TEST_EXIT_AFTER_LEDGER"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    epsilon: float  # spent so far
    epsilon_after: float  # after this round, if it trained
    reason: str = ""
    run_epsilon: float = 0.0  # what the run asked about has spent so far (`check(run=...)`)


def state_dir_for(config: Config, client_id: int, node_state_dir: str = "") -> Path:
    """Where a node keeps its ledger: the node's own `state-dir`, else the run's
    `run.state_dir/client-<id>`, else (with a warning) inside the run folder."""
    if node_state_dir:
        return Path(node_state_dir)
    if config.run.state_dir:
        return Path(config.run.state_dir) / f"client-{client_id}"
    if not config.run.out_dir:
        raise ValueError("privacy: no state folder for the ledger: set run.state_dir "
                         "(--state-dir) or the node config key state-dir")
    path = Path(config.run.out_dir) / "node-state" / f"client-{client_id}"
    logger.warning("client %d: no state folder given; the privacy ledger lives with the run "
                   "in %s, not with the data: a new run will start it from zero (use --state-dir)",
                   client_id, path)
    return path


class ClientPrivacy:
    def __init__(self, plan: DPPlan, state_dir: Path):
        self.plan = plan
        self.path = Path(state_dir) / LEDGER_FILE

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.load(self.path)

    def check(self, *, message: str = "", run: str = "") -> Verdict:
        """May this round's steps be spent without passing the cap? A `message` already
        charged (re-sent because its first reply never left the node) is allowed.
        With `run`, the verdict also says what that run has spent."""
        ledger, p = self.ledger(), self.plan
        now = ledger.epsilon(delta=p.delta, accountant=p.accountant)
        if message and ledger.charged_for(message) is not None:
            return Verdict(True, now, now)
        after = ledger.epsilon_after(steps=p.steps_per_round, noise_multiplier=p.noise_multiplier,
                                     sample_rate=p.sample_rate, delta=p.delta, accountant=p.accountant)
        # A hair of slack: the calibrated schedule ends at the target up to float rounding.
        if after > p.epsilon_cap * (1 + 1e-9):
            spent = ledger.run_epsilon(run, delta=p.delta, accountant=p.accountant) if run else 0.0
            return Verdict(False, now, after, f"privacy budget: epsilon {now:.3f} spent, this round "
                           f"would reach {after:.3f} > cap {p.epsilon_cap:.3f}", spent)
        return Verdict(True, now, after)

    def run_epsilon(self, run: str) -> float:
        """What run `run` has spent on this node's data (its ledger entries alone)."""
        return self.ledger().run_epsilon(run, delta=self.plan.delta, accountant=self.plan.accountant)

    def charge(self, *, run: str, server_round: int, steps: int, message: str = "") -> float:
        """Record the round in the ledger on disk (atomically); return epsilon after it.

        `message` (Flower's message id) is charged once: the same message handled
        again, because a worker died after charging and before its reply left the
        node, releases one update in all and adds nothing."""
        ledger, p = self.ledger(), self.plan
        if message and ledger.charged_for(message) is not None:
            logger.info("message %s: already charged (re-sent after a lost reply); not charged again", message)
            return ledger.epsilon(delta=p.delta, accountant=p.accountant)
        eps = ledger.record(run=run, server_round=server_round, steps=steps,
                            noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                            delta=p.delta, accountant=p.accountant, message=message)
        ledger.save(self.path)
        if os.environ.get(EXIT_AFTER_CHARGE_ENV):
            os._exit(75)
        return eps


@functools.lru_cache(maxsize=64)
def client_privacy(config: Config, client_id: int, num_records: int, state_dir: Path) -> ClientPrivacy:
    """The guard of one client for one configuration; the plan is computed once."""
    plan = sample_plan(config, num_records)
    cap = "none" if math.isinf(plan.epsilon_cap) else f"{plan.epsilon_cap:g}"
    logger.info("client %d | DP plan: noise %.4f | sample rate %.4f | clip %g | %d steps planned "
                "| cap %s", client_id, plan.noise_multiplier, plan.sample_rate, plan.max_grad_norm,
                plan.planned_steps, cap)
    if math.isinf(plan.epsilon_cap):
        logger.warning("client %d | no lifetime privacy budget (privacy.budget_epsilon): this run "
                       "costs at most its target, but runs on the same data compose without a cap",
                       client_id)
    return ClientPrivacy(plan, state_dir)
