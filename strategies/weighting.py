"""How much each reply weighs in an aggregate: the one place that decides (``strategy.weighting``).

A reply's weight is the example count its client reports (``num-examples``),
which the server cannot check. The choices:

- ``"capped"`` (default): the reported count, but no more than
  ``strategy.weight_cap`` times the round's median count (the lower median of
  the replies that report any examples). With an honest majority in the round
  the median is an honest client's count, so one client's claim of a billion
  examples weighs as ``weight_cap`` typical clients, never as the whole round.
  An honest but unusually large client is capped too: that is the price.
- ``"reported"``: the reported count as is (Flower's FedAvg).
- ``"equal"``: every reply that reports any examples weighs 1 (client-level DP
  always weighs so: a weight above 1 would let one client's influence exceed
  the clip).

The server does not see a node's node config (it lives on the node, set by the
node's own operator), so a count "declared" there is the same claim as the
reply's, not a bound.

`Weighting.apply` writes the weights into the replies' ``num-examples`` before
the inner strategy aggregates, so Flower's FedAvg, the server optimisers,
flora's stacking, Krum's average and the metric averages all read the same
weights. The round's record keeps each client's reported count; a client whose
weight differs from it gets a ``weight`` entry, and the round counts them.
Train and evaluation replies are weighed by the same rule, each among its own
round's replies.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

from fedcl import keys
from fedcl.federation.messages import reply_metrics
from fedcl.strategies.screening import number

WEIGHTINGS = ("capped", "reported", "equal")


def bounded_weights(counts: Sequence[int], *, weighting: str, cap: float) -> list[int]:
    """Each count's weight under `weighting` (`cap`: the multiple of the median for "capped").

    A count of 0 (a client with no evaluation records) weighs 0 under every rule,
    and takes no part in the median.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"strategy.weighting: got {weighting!r}, expected one of {', '.join(WEIGHTINGS)}")
    counts = [int(c) for c in counts]
    if weighting == "reported":
        return counts
    if weighting == "equal":
        return [1 if c > 0 else 0 for c in counts]
    positive = [c for c in counts if c > 0]
    if not positive:
        return counts
    # The lower median is a count some client reported; rounding down keeps weights whole.
    limit = max(1, int(cap * statistics.median_low(positive)))
    return [min(c, limit) for c in counts]


class Weighting:
    """`strategy.weighting` and `strategy.weight_cap`, applied to a round's admitted replies."""

    def __init__(self, *, weighting: str, cap: float) -> None:
        bounded_weights([], weighting=weighting, cap=cap)  # refuses an unknown rule now, not mid-run
        self.weighting = weighting
        self.cap = cap

    def apply(self, replies: Sequence[Message], rec: dict, *, entries: Sequence[dict] | None = None,
              equal: bool = False, evaluation: bool = False) -> None:
        """Write each reply's weight into its ``num-examples``; `entries` (train): the replies'
        client entries, annotated where the weight differs from the reported count.
        `equal`: weigh equally whatever the configured rule (client-level DP)."""
        counts = [int(number(reply_metrics(m), keys.NUM_EXAMPLES_MSG)) for m in replies]
        weights = bounded_weights(counts, weighting="equal" if equal else self.weighting, cap=self.cap)
        changed = 0
        for i, (msg, count, weight) in enumerate(zip(replies, counts, weights)):
            if weight == count:
                continue
            reply_metrics(msg)[keys.NUM_EXAMPLES_MSG] = weight
            changed += 1
            if entries is not None:
                entries[i][keys.CLIENT_WEIGHT] = weight
            if self.weighting == "capped" and not equal:
                log(WARNING, "round %d: %s reply of node %d weighs %d, not the %d examples it reports "
                    "(strategy.weight_cap=%g x the round's median)", rec[keys.ROUND],
                    "evaluation" if evaluation else "train", msg.metadata.src_node_id, weight, count, self.cap)
        rec[keys.WEIGHT_CAPPED_EVAL if evaluation else keys.WEIGHT_CAPPED] = changed
