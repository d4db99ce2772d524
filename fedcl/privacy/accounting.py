"""Privacy accounting: noise calibration, epsilon from a step history, the DP plan.

The accountant is Opacus' own (RDP or PRV), fed a history of
``(noise_multiplier, sample_rate, steps)`` triples, so any ledger can be
recomputed from scratch. `plan_for` fixes one client's DP-SGD parameters for a
run, once, before any training: the noise is calibrated to the whole planned
schedule (every local step of every round), never per round.

`sample_plan(config, num_records)` and `client_level_plan(config)` are the one
place a run's configuration becomes a plan: every caller (the ClientApp, the
continual node, the pre-flight, the server's privacy report, the client-level
strategy) goes through them, so the settings a plan reads are named once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from fedcl.config import Config, ConfigError, PrivacyConfig

History = list[tuple[float, float, int]]


def epsilon(history: History, *, delta: float, accountant: str) -> float:
    """(epsilon at `delta`) of composing every entry of `history`, by Opacus' accountant."""
    if not history:
        return 0.0
    from opacus.accountants.utils import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(n), float(q), int(s)) for n, q, s in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """The smallest noise multiplier (Opacus' binary search) whose `steps` cost <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


@dataclass(frozen=True)
class DPPlan:
    """One client's DP-SGD parameters for a run, fixed before its first step."""

    noise_multiplier: float
    sample_rate: float  # Poisson: each record joins each step's batch with this probability
    expected_batch_size: int  # the mean-loss denominator, whatever a batch's actual size
    max_grad_norm: float
    steps_per_round: int
    planned_steps: int  # rounds x steps_per_round: what the noise was calibrated for
    delta: float
    accountant: str
    epsilon_cap: float  # math.inf: no cap

    def to_dict(self) -> dict:
        out = asdict(self)
        out["epsilon_cap"] = None if math.isinf(self.epsilon_cap) else self.epsilon_cap
        return out


def plan_for(cfg: PrivacyConfig, *, num_records: int, batch_size: int, local_steps: int,
             rounds: int, proximal_mu: float = 0.0) -> DPPlan:
    """Check the settings against the client's data and calibrate its noise.

    Raises ConfigError (naming the key) before any training when delta is not
    below 1/N, or when the budget cannot pay for even one step.
    """
    if not cfg.enabled:
        raise ConfigError("privacy: DP is off (set privacy.target_epsilon or privacy.noise_multiplier)")
    if proximal_mu > 0:  # opacus#249: the DP optimizer would silently drop the term
        raise ConfigError(f"strategy.proximal_mu (fedprox): got {proximal_mu!r}, expected 0 with "
                          "privacy on (a loss term outside the per-example loss is lost under DP-SGD)")
    if num_records < 1:
        raise ConfigError("privacy: a client with no training records cannot train privately")
    if cfg.delta >= 1.0 / num_records:
        raise ConfigError(f"privacy.delta: got {cfg.delta!r}, expected a value below 1/N = "
                          f"{1.0 / num_records:.3g} for a client with N={num_records} training records")
    sample_rate = min(1.0, batch_size / num_records)
    planned = rounds * local_steps
    noise = cfg.noise_multiplier or calibrate_noise(
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=sample_rate,
        steps=planned, accountant=cfg.accountant)
    plan = DPPlan(noise_multiplier=noise, sample_rate=sample_rate,
                  expected_batch_size=max(1, round(sample_rate * num_records)),
                  max_grad_norm=cfg.max_grad_norm, steps_per_round=local_steps, planned_steps=planned,
                  delta=cfg.delta, accountant=cfg.accountant, epsilon_cap=cfg.epsilon_cap)
    one_step = epsilon([(noise, sample_rate, 1)], delta=cfg.delta, accountant=cfg.accountant)
    if one_step > plan.epsilon_cap:
        key = "privacy.budget_epsilon" if cfg.budget_epsilon else "privacy.target_epsilon"
        raise ConfigError(f"{key}: got {plan.epsilon_cap!r}, expected at least one step's cost "
                          f"{one_step:.4g} (noise {noise:.4g}, sample rate {sample_rate:.4g})")
    return plan


def sample_plan(config: Config, num_records: int) -> DPPlan:
    """The sample-level DP plan of a client holding `num_records` training records under `config`."""
    return plan_for(config.privacy, num_records=num_records, batch_size=config.train.batch_size,
                    local_steps=config.train.local_steps, rounds=config.federation.rounds,
                    proximal_mu=config.strategy.client_proximal_mu)


@dataclass(frozen=True)
class ClientDPPlan:
    """Client-level DP of a run (privacy.mode = "client"), fixed before round 1.

    Each round the server clips every client's update to `clip`, averages them
    with equal weights and adds Gaussian noise of std noise_multiplier * clip /
    (clients averaged): one Gaussian release per round, subsampled at
    `sample_rate`. What it protects is a whole client's participation.
    """

    noise_multiplier: float
    clip: float
    sample_rate: float  # clients_per_round / clients (1.0 when all are sampled)
    num_sampled: int
    rounds: int  # what the noise was calibrated for
    delta: float
    accountant: str

    def epsilon_after(self, rounds: int) -> float:
        """Client-level epsilon at `delta` after `rounds` releases (inf without noise)."""
        if self.noise_multiplier <= 0:
            return math.inf
        return epsilon([(self.noise_multiplier, self.sample_rate, rounds)], delta=self.delta,
                       accountant=self.accountant)

    def to_dict(self) -> dict:
        return asdict(self)


def client_plan(cfg: PrivacyConfig, *, clients: int, clients_per_round: int, rounds: int) -> ClientDPPlan:
    """Calibrate client-level DP once: noise for `rounds` releases at q = sampled / clients.

    The accountant assumes each client joins a round independently with
    probability q; fedcl samples a fixed number per round, the usual approximation.
    """
    if not cfg.enabled:
        raise ConfigError("privacy: DP is off (set privacy.target_epsilon or privacy.noise_multiplier)")
    sampled = clients_per_round or clients
    sample_rate = min(1.0, sampled / clients)
    noise = cfg.noise_multiplier or calibrate_noise(
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=sample_rate, steps=rounds,
        accountant=cfg.accountant)
    return ClientDPPlan(noise_multiplier=noise, clip=cfg.max_grad_norm, sample_rate=sample_rate,
                        num_sampled=sampled, rounds=rounds, delta=cfg.delta, accountant=cfg.accountant)


def client_level_plan(config: Config) -> ClientDPPlan:
    """The client-level DP plan of the run `config` describes."""
    fed = config.federation
    return client_plan(config.privacy, clients=fed.clients, clients_per_round=fed.clients_per_round,
                       rounds=fed.rounds)
