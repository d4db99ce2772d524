"""Client-level differential privacy (``privacy.mode = "client"``) on the server.

What it protects is a client's participation: whether an institution took part
at all, not just any one of its records. Each round the server

1. decodes and screens every reply as usual (`LoraStrategy.screen_reply`),
2. clips each client's update (trained - global) to L2 norm
   ``privacy.max_grad_norm`` with Flower's own `compute_clip_model_update`,
3. averages the clipped updates with **equal weights** (FedAvg's example-count
   weighting would let one client's weight, and so its influence, exceed the
   clip), and
4. adds Gaussian noise of std noise_multiplier * clip / n to the average,
   n the number of clients averaged (Flower's `compute_stdv`).

This is the algorithm of Flower's `DifferentialPrivacyServerSideFixedClipping`
(DP-FedAvg, McMahan et al. 2018), composed into the strategy rather than
wrapped around it: the wrapper clips replies *before* the wrapped strategy
sees them, but fedcl's replies carry float16/int8 updates that only
`screen_reply` turns into weights, and the wrapper drops a whole round when
any node fails. Using n = replies averaged (not the number sampled) only ever
makes the noise larger when nodes drop out.

The noise is drawn from OS entropy, never from the run seed: noise anyone can
regenerate protects nothing. Epsilon is Opacus' accountant over one Gaussian
release per round at sample rate clients_per_round / clients; every round
records it as ``client_dp.epsilon``.
"""

from __future__ import annotations

from collections import OrderedDict
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from fedcl.config import ConfigError
from fedcl.privacy.accounting import ClientDPPlan, client_plan
from strategies.base import NUM_EXAMPLES
from strategies.fedavg import FfaLora, LoraFedAvg, LoraFedProx
from strategies.lora import LoraStrategy, finish, flower_kwargs

# Below this many clients per round the noise (std ~ clip / n) swamps the mean update.
FEW_CLIENTS = 20


class ClientLevelDP:
    """Mixin placed before a `LoraStrategy` over FedAvg: clip, equal weights, noise."""

    def setup_client_dp(self, plan: ClientDPPlan, rng: np.random.Generator | None = None) -> None:
        self.dp_plan = plan
        self.dp_rng = rng or np.random.default_rng()  # OS entropy

    def screen_reply(self, msg: Message, rec: dict) -> Message | None:
        msg = super().screen_reply(msg, rec)  # type: ignore[misc]
        if msg is None:
            return None
        start = self.update_start()  # type: ignore[attr-defined]
        record = msg.content["arrays"]
        weights = record.to_numpy_ndarrays()
        base = [start[name].numpy() for name in record.keys()]
        norm = get_norm([w - b for w, b in zip(weights, base)])
        if norm > 0:  # Flower's clip divides by the norm
            compute_clip_model_update(param1=weights, param2=base, clipping_norm=self.dp_plan.clip)
        msg.content["arrays"] = ArrayRecord(OrderedDict(
            (name, Array(np.asarray(w, dtype=np.float32))) for name, w in zip(record.keys(), weights)))
        # Equal weights: the count FedAvg weighs by becomes 1 once the bookkeeping has
        # recorded (and screened) the real one; evaluation stays weighted by examples.
        next(iter(msg.content.metric_records.values()))[NUM_EXAMPLES] = 1
        dp = rec.setdefault("client_dp", {"clipped": 0, "averaged": 0})
        dp["clipped"] += int(norm > self.dp_plan.clip)
        dp["averaged"] += 1
        return msg

    def aggregate_train(self, server_round: int, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        rec = self.record(server_round)  # type: ignore[attr-defined]
        plan = self.dp_plan
        dp = rec.setdefault("client_dp", {"clipped": 0, "averaged": 0})
        # A configured round counts as a release whether or not it aggregated: an upper bound.
        eps = plan.epsilon_after(rec["round"])
        dp.update(noise_multiplier=plan.noise_multiplier, clip=plan.clip,
                  epsilon=None if not np.isfinite(eps) else eps, delta=plan.delta)
        if arrays is not None:
            std = compute_stdv(plan.noise_multiplier, plan.clip, dp["averaged"])
            dp["noise_std"] = std
            arrays = ArrayRecord(OrderedDict(
                (name, Array((a.numpy() + self.dp_rng.normal(0.0, std, a.shape)).astype(np.float32)))
                for name, a in arrays.items()))
        log(INFO, "round %d: client-level DP | clipped %d of %d | noise std %.4g | epsilon %.4g",
            rec["round"], dp["clipped"], dp["averaged"], dp.get("noise_std", 0.0), eps)
        return arrays, metrics


class ClientDPFedAvg(ClientLevelDP, LoraFedAvg):
    """FedAvg, equally weighted, with client-level DP."""


class ClientDPFfaLora(ClientLevelDP, FfaLora):
    """FFA-LoRA (only lora_B travels) with client-level DP."""


class ClientDPFedProx(ClientLevelDP, LoraFedProx):
    """FedProx (server side: FedAvg) with client-level DP."""


CLASSES: dict[str, type[LoraStrategy]] = {
    "fedavg": ClientDPFedAvg, "ffa-lora": ClientDPFfaLora, "fedprox": ClientDPFedProx}


def plan_for_run(config) -> ClientDPPlan:
    fed = config.federation
    return client_plan(config.privacy, clients=fed.clients, clients_per_round=fed.clients_per_round,
                       rounds=fed.rounds)


def build(config, *, round_offset: int = 0, reply_template: dict | None = None,
          plan: ClientDPPlan | None = None, rng: np.random.Generator | None = None) -> LoraStrategy:
    """The client-level DP strategy for `config.strategy.name` (`plan`: tests may fix it)."""
    name = config.strategy.name
    if name not in CLASSES:
        raise ConfigError(f"strategy.name: got {name!r}, expected one of {', '.join(CLASSES)} with "
                          'privacy.mode = "client" (the noise is calibrated to a plain average)')
    plan = plan or plan_for_run(config)
    kwargs = flower_kwargs(config)
    if name == "fedprox":
        kwargs["proximal_mu"] = config.strategy.proximal_mu
    strategy = finish(CLASSES[name](**kwargs), config, round_offset=round_offset, reply_template=reply_template)
    strategy.setup_client_dp(plan, rng)  # type: ignore[attr-defined]
    if plan.num_sampled < FEW_CLIENTS:
        log(WARNING, "client-level DP with %d clients per round: the noise std (noise %.3g x clip %.3g / %d) "
            "is large next to the mean update; it needs many clients", plan.num_sampled,
            plan.noise_multiplier, plan.clip, plan.num_sampled)
    log(INFO, "client-level DP | noise %.4g | clip %.4g | q %.3g | epsilon after %d rounds %.4g at delta %g",
        plan.noise_multiplier, plan.clip, plan.sample_rate, plan.rounds, plan.epsilon_after(plan.rounds),
        plan.delta)
    return strategy
