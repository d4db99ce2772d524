"""Evaluation figures, computed from labels and predictions alone.

Every report puts accuracy beside the majority-class baseline of the same
split (the accuracy of always answering its most frequent class), so a reader
sees at once whether the model learned anything.
"""

from __future__ import annotations

import math
from collections import Counter

from fedcl.keys import ACCURACY, LOSS, MACRO_F1, MAJORITY, NUM_EXAMPLES, PER_CLASS, PERPLEXITY


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
