"""Client-level differential privacy (``privacy.mode = "client"``) as a part of the aggregation.

What it protects is a client's participation: whether an institution took part
at all, not just any one of its records. Each round the strategy

1. decodes and screens every reply as usual (`strategies.screening.ReplyScreen`),
2. clips each client's update (trained - global) to L2 norm
   ``privacy.max_grad_norm`` with Flower's own `compute_clip_model_update`,
3. averages the clipped updates with **equal weights** (FedAvg's example-count
   weighting would let one client's weight, and so its influence, exceed the
   clip; `strategies.weighting` applies them, whatever ``strategy.weighting``), and
4. adds Gaussian noise of std noise_multiplier * clip / n to the average,
   n the number of clients averaged (Flower's `compute_stdv`).

This is the algorithm of Flower's `DifferentialPrivacyServerSideFixedClipping`
(DP-FedAvg, McMahan et al. 2018), composed into the strategy rather than
wrapped around it: the wrapper clips replies *before* the wrapped strategy
sees them, but fedcl's replies carry float16/int8 updates that only screening
turns into weights, and the wrapper drops a whole round when any node fails.
Using n = replies averaged (not the number sampled) only ever makes the noise
larger when nodes drop out.

The noise is drawn from OS entropy, never from the run seed: noise anyone can
regenerate protects nothing. Epsilon is Opacus' accountant over one Gaussian
release per round at sample rate clients_per_round / clients; every round
records it as ``client_dp.epsilon``. The plan comes from
`fedcl.privacy.accounting.client_level_plan`; `strategies.client_dp` builds
the strategies that carry this part.
"""

from __future__ import annotations

from collections import OrderedDict
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from fedcl import keys
from fedcl.privacy.accounting import ClientDPPlan


class ClientLevelDP:
    """Clip each admitted update, weigh clients equally, noise the average, record epsilon."""

    def __init__(self, plan: ClientDPPlan, rng: np.random.Generator | None = None) -> None:
        self.plan = plan
        self.rng = rng or np.random.default_rng()  # OS entropy

    @staticmethod
    def _round_record(rec: dict) -> dict:
        return rec.setdefault(keys.CLIENT_DP, {keys.DP_CLIPPED: 0, keys.DP_AVERAGED: 0})

    def clip(self, msg: Message, start: dict[str, torch.Tensor], rec: dict) -> None:
        """Clip the update an admitted reply holds (its arrays: float32 absolute state) to the plan's norm."""
        record = msg.content.array_records[keys.ARRAYS]
        weights = record.to_numpy_ndarrays()
        base = [start[name].numpy() for name in record.keys()]
        norm = get_norm([w - b for w, b in zip(weights, base)])
        if norm > 0:  # Flower's clip divides by the norm
            compute_clip_model_update(param1=weights, param2=base, clipping_norm=self.plan.clip)
        msg.content[keys.ARRAYS] = ArrayRecord(OrderedDict(
            (name, Array(np.asarray(w, dtype=np.float32))) for name, w in zip(record.keys(), weights)))
        dp = self._round_record(rec)
        dp[keys.DP_CLIPPED] += int(norm > self.plan.clip)
        dp[keys.DP_AVERAGED] += 1

    def release(self, arrays: ArrayRecord | None, rec: dict) -> ArrayRecord | None:
        """Noise the aggregate (None: the round did not aggregate) and record the round's DP figures."""
        plan = self.plan
        dp = self._round_record(rec)
        # A configured round counts as a release whether or not it aggregated: an upper bound.
        eps = plan.epsilon_after(rec[keys.ROUND])
        dp.update({keys.DP_NOISE_MULTIPLIER: plan.noise_multiplier, keys.DP_CLIP: plan.clip,
                   keys.DP_EPSILON: None if not np.isfinite(eps) else eps, keys.DP_DELTA: plan.delta})
        if arrays is not None:
            std = compute_stdv(plan.noise_multiplier, plan.clip, dp[keys.DP_AVERAGED])
            dp[keys.DP_NOISE_STD] = std
            arrays = ArrayRecord(OrderedDict(
                (name, Array((a.numpy() + self.rng.normal(0.0, std, a.shape)).astype(np.float32)))
                for name, a in arrays.items()))
        log(INFO, "round %d: client-level DP | clipped %d of %d | noise std %.4g | epsilon %.4g",
            rec[keys.ROUND], dp[keys.DP_CLIPPED], dp[keys.DP_AVERAGED], dp.get(keys.DP_NOISE_STD, 0.0), eps)
        return arrays
