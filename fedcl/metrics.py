"""Evaluation figures, computed from labels and predictions alone.

Every report puts accuracy beside the majority-class baseline of the same
split (the accuracy of always answering its most frequent class), so a reader
sees at once whether the model learned anything.
"""

from __future__ import annotations

import math
from collections import Counter

from fedcl.keys import (ACCURACY, AVERAGE_PRECISION, LOSS, MACRO_F1, MAJORITY, NUM_EXAMPLES, PER_CLASS, PERPLEXITY,
                        RECALL_AT_PRECISION, ROC_AUC, TARGET_PRECISION, THRESHOLD_AT_PRECISION)


def classification_report(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall and the majority baseline."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    n = len(y_true)
    if n == 0:
        return {ACCURACY: 0.0, MACRO_F1: 0.0, MAJORITY: 0.0, NUM_EXAMPLES: 0, PER_CLASS: {}}
    per_class, f1s = {}, []
    for k, name in enumerate(labels):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == k and p == k)
        predicted = sum(1 for p in y_pred if p == k)
        actual = sum(1 for t in y_true if t == k)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        if actual or predicted:  # classes absent from both do not drag the mean down
            f1s.append(f1)
    counts = Counter(y_true)
    return {
        ACCURACY: sum(1 for t, p in zip(y_true, y_pred) if t == p) / n,
        MACRO_F1: sum(f1s) / len(f1s) if f1s else 0.0,
        MAJORITY: counts.most_common(1)[0][1] / n,
        NUM_EXAMPLES: n,
        PER_CLASS: per_class,
    }


def language_model_report(total_loss: float, total_tokens: int, num_examples: int) -> dict:
    loss = total_loss / max(total_tokens, 1)
    return {LOSS: loss, PERPLEXITY: math.exp(min(loss, 50.0)), NUM_EXAMPLES: num_examples}


# -- ranking figures for a binary task: what a bank or a hospital reads ---------------
# Accuracy hides a rare class (a model that flags nothing scores the majority
# share); these read the positive class's scores without any threshold.

def _ranked(y_true: list[int], scores: list[float]) -> list[tuple[float, int]]:
    if len(y_true) != len(scores):
        raise ValueError(f"{len(y_true)} labels but {len(scores)} scores")
    return sorted(zip(scores, y_true), key=lambda pair: -pair[0])


def roc_auc(y_true: list[int], scores: list[float]) -> float | None:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half.

    None when the records hold only one class (the curve is undefined).
    """
    positives = sum(1 for t in y_true if t == 1)
    negatives = len(y_true) - positives
    if positives == 0 or negatives == 0:
        return None
    # Mann-Whitney: average ranks over ties, then the positives' rank sum.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, t in zip(ranks, y_true) if t == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _operating_points(y_true: list[int], scores: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) at each distinct score, flagging score >= threshold."""
    positives = sum(1 for t in y_true if t == 1)
    points, tp, fp = [], 0, 0
    ranked = _ranked(y_true, scores)
    for i, (score, truth) in enumerate(ranked):
        tp += truth == 1
        fp += truth != 1
        if i + 1 == len(ranked) or ranked[i + 1][0] != score:  # the last record at this score
            points.append((score, tp / (tp + fp), tp / positives))
    return points


def average_precision(y_true: list[int], scores: list[float]) -> float | None:
    """Sum over thresholds of precision x the recall it adds (no interpolation); None without positives."""
    if not any(t == 1 for t in y_true):
        return None
    total, last_recall = 0.0, 0.0
    for _, precision, recall in _operating_points(y_true, scores):
        total += precision * (recall - last_recall)
        last_recall = recall
    return total


def recall_at_precision(y_true: list[int], scores: list[float], precision: float) -> tuple[float, float | None]:
    """The highest recall whose precision reaches `precision`, and the lowest threshold that gives it.

    (0.0, None) when no threshold reaches it (or there are no positives).
    """
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision: got {precision!r}, expected a value in (0, 1]")
    if not any(t == 1 for t in y_true):
        return 0.0, None
    best = (0.0, None)
    for threshold, p, recall in _operating_points(y_true, scores):
        if p >= precision and recall >= best[0]:
            best = (recall, threshold)
    return best


def ranking_report(y_true: list[int], scores: list[float], *, precision: float) -> dict:
    """ROC AUC, average precision and recall at `precision` of the positive class (label 1) scores."""
    recall, threshold = recall_at_precision(y_true, scores, precision)
    return {ROC_AUC: roc_auc(y_true, scores), AVERAGE_PRECISION: average_precision(y_true, scores),
            RECALL_AT_PRECISION: recall, THRESHOLD_AT_PRECISION: threshold, TARGET_PRECISION: precision}
