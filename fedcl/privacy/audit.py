"""An empirical lower bound on epsilon from a membership test on canaries.

Differential privacy promises that for any test deciding whether one record
was trained on, TPR <= exp(eps) * FPR + delta, and likewise
(1 - FPR) <= exp(eps) * (1 - TPR) + delta. Train with some canaries ("in"),
hold others out ("out"), score each canary with the trained model (higher:
more likely a member, e.g. minus its loss) and every threshold on the scores
is such a test. Its observed rates are only estimates, so they are replaced by
one-sided Clopper-Pearson bounds (TPR from below, FPR from above) before
solving for eps::

    bound = audit_bound(scores_in, scores_out, alpha=0.05, delta=1e-5)
    bound.epsilon        # >= 0; the accounted epsilon should never be below it

The sweep takes the best threshold after looking at the scores, so alpha is
split over every threshold tried (Bonferroni): the bound holds with
probability at least 1 - alpha whichever threshold wins. With n canaries a
side the bound can never exceed `max_provable_epsilon(n, n)` (about 1.7 for
50 a side at alpha 0.05): a small audit can refute a too-small accounted
epsilon, not confirm a large one.

Scipy is imported here only; nothing else in fedcl.privacy needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class AuditBound:
    epsilon: float  # the lower bound, >= 0
    threshold: float  # score at or above which a canary is called a member (nan: none helped)
    tpr_lower: float  # Clopper-Pearson bounds at the winning threshold
    fpr_upper: float
    form: str  # "tpr/fpr" or "(1-fpr)/(1-tpr)": which DP inequality gave the bound
    n_in: int
    n_out: int
    thresholds: int  # how many thresholds alpha was split over
    alpha: float
    delta: float

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("epsilon", "threshold", "tpr_lower", "fpr_upper", "form",
                                             "n_in", "n_out", "thresholds", "alpha", "delta")}
        out["threshold"] = None if math.isnan(self.threshold) else self.threshold  # JSON has no NaN
        return out


def _cp_lower(successes: int, trials: int, beta: float) -> float:
    """One-sided Clopper-Pearson lower bound at level beta (P[true p < bound] <= beta)."""
    from scipy.stats import beta as beta_dist

    if successes == 0:
        return 0.0
    return float(beta_dist.ppf(beta, successes, trials - successes + 1))


def _cp_upper(successes: int, trials: int, beta: float) -> float:
    from scipy.stats import beta as beta_dist

    if successes == trials:
        return 1.0
    return float(beta_dist.ppf(1.0 - beta, successes + 1, trials - successes))


def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=float).ravel()
    if scores.size == 0:
        raise ValueError(f"{name}: got no scores, expected at least one canary")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: got a NaN or infinite score; score every canary with a finite number")
    return scores


def _log_ratio(numerator: float, denominator: float) -> float:
    # A bound only counts when the numerator is positive; a zero denominator
    # cannot occur (Clopper-Pearson bounds are strictly inside (0, 1) there).
    if numerator <= 0.0 or denominator <= 0.0:
        return 0.0
    return max(0.0, math.log(numerator / denominator))


def audit_bound(scores_in: Sequence[float], scores_out: Sequence[float], *, alpha: float = 0.05,
                delta: float = 0.0) -> AuditBound:
    """The largest epsilon any threshold on the scores proves, at confidence 1 - alpha.

    `scores_in`: the trained-on canaries' scores, `scores_out`: the held-out
    ones'; higher means "more likely trained on". Never negative, never NaN.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: got {alpha!r}, expected a float in (0, 1)")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta: got {delta!r}, expected a float in [0, 1)")
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    thresholds = np.unique(np.concatenate([s_in, s_out]))
    # Two one-sided bounds per threshold; both DP inequalities use the same two.
    beta = alpha / (2 * len(thresholds))
    best = AuditBound(0.0, math.nan, 0.0, 1.0, "none", s_in.size, s_out.size, len(thresholds), alpha, delta)
    for t in thresholds:
        tp, fp = int((s_in >= t).sum()), int((s_out >= t).sum())
        tpr_lo, fpr_hi = _cp_lower(tp, s_in.size, beta), _cp_upper(fp, s_out.size, beta)
        for form, eps in (("tpr/fpr", _log_ratio(tpr_lo - delta, fpr_hi)),
                          ("(1-fpr)/(1-tpr)", _log_ratio(1.0 - fpr_hi - delta, 1.0 - tpr_lo))):
            if eps > best.epsilon:
                best = AuditBound(eps, float(t), tpr_lo, fpr_hi, form, s_in.size, s_out.size,
                                  len(thresholds), alpha, delta)
    return best


def epsilon_lower_bound(scores_in: Sequence[float], scores_out: Sequence[float], *, alpha: float = 0.05,
                        delta: float = 0.0) -> float:
    """`audit_bound(...).epsilon`: the epsilon the canaries prove, >= 0."""
    return audit_bound(scores_in, scores_out, alpha=alpha, delta=delta).epsilon


def max_provable_epsilon(n_in: int, n_out: int, *, alpha: float = 0.05, delta: float = 0.0) -> float:
    """What perfectly separated scores of n_in and n_out canaries would prove: the audit's ceiling."""
    perfect_in = np.arange(n_in, dtype=float) + n_out  # every member above every non-member
    return epsilon_lower_bound(perfect_in, np.arange(n_out, dtype=float), alpha=alpha, delta=delta)
