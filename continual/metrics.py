"""Continual-learning figures from the accuracy matrix.

Conventions. Tasks are numbered 0..T-1. ``R[k][j]`` is the accuracy on task j's
test set after training on task k (rows: training progress, columns: tasks);
``b[j]`` is the accuracy on task j before any training (the zero-shot model).
R may have K <= T rows while a stream is in progress; every figure then uses
the last row k = K-1 and the tasks learned so far (j <= K-1).

    ACC  = mean_{j<=K-1}  R[K-1][j]                               average accuracy
    BWT  = mean_{j<K-1}   R[K-1][j] - R[j][j]                     backward transfer
                                                                  (Lopez-Paz & Ranzato 2017)
    F    = mean_{j<K-1}   max_{k<K-1} R[k][j] - R[K-1][j]         forgetting, maximum-based
                                                                  (Chaudhry et al. 2018; the
                                                                  max runs over every earlier row)
    F_av = mean_{j<K-1}   R[j][j] - R[K-1][j]                     Avalanche's forgetting: right
                                                                  after training on j minus now
    FWT  = mean_{1<=j<=K-1} R[j-1][j] - b[j]                      forward transfer (GEM's, with
                                                                  b the zero-shot accuracies)

F_av equals -BWT; it differs from F when a later task raised an old task's
accuracy above its value right after training (F counts that peak as lost).
BWT, F and F_av need K >= 2 and FWT needs K >= 2 and b; otherwise they are NaN
and `summary` leaves them out. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Metric keys, in one place.
ACC = "cl_accuracy"
BWT = "cl_backward_transfer"
FORGETTING = "cl_forgetting"
FORGETTING_AVALANCHE = "cl_forgetting_avalanche"
FWT = "cl_forward_transfer"


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[0] > m.shape[1]:
        raise ValueError(f"accuracy matrix: got shape {m.shape}, expected K x T rows with 1 <= K <= T")
    if not np.isfinite(m).all():
        raise ValueError("accuracy matrix: holds non-finite values")
    return m


def average_accuracy(R) -> float:
    m = _matrix(R)
    k = m.shape[0] - 1
    return float(m[k, : k + 1].mean())


def backward_transfer(R) -> float:
    m = _matrix(R)
    k = m.shape[0] - 1
    if k < 1:
        return math.nan
    return float(np.mean([m[k, j] - m[j, j] for j in range(k)]))


def forgetting(R) -> float:
    """Maximum-based forgetting (Chaudhry et al. 2018)."""
    m = _matrix(R)
    k = m.shape[0] - 1
    if k < 1:
        return math.nan
    return float(np.mean([m[:k, j].max() - m[k, j] for j in range(k)]))


def avalanche_forgetting(R) -> float:
    """Avalanche's forgetting: accuracy right after training on j minus the latest, averaged
    (the negated backward transfer)."""
    return 0.0 - backward_transfer(R)  # not -bwt: no negative zero in metrics.json


def forward_transfer(R, b: Sequence[float]) -> float:
    m = _matrix(R)
    base = np.asarray(b, dtype=float)
    if base.shape != (m.shape[1],):
        raise ValueError(f"zero-shot accuracies: got {base.shape[0] if base.ndim else 0} values "
                         f"for {m.shape[1]} tasks")
    k = m.shape[0] - 1
    if k < 1:
        return math.nan
    return float(np.mean([m[j - 1, j] - base[j] for j in range(1, k + 1)]))


def summary(R, b: Sequence[float] | None = None) -> dict[str, float]:
    """Every defined figure under its key (NaN ones and FWT without `b` left out)."""
    figures = {ACC: average_accuracy(R), BWT: backward_transfer(R), FORGETTING: forgetting(R),
               FORGETTING_AVALANCHE: avalanche_forgetting(R)}
    if b is not None:
        figures[FWT] = forward_transfer(R, b)
    return {key: value for key, value in figures.items() if not math.isnan(value)}
