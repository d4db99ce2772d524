"""The server's binary threshold is chosen on its validation split, never on the test split."""

from __future__ import annotations

import csv

import pytest
import torch

from fedcl import metrics
from fedcl.config import ConfigError, load_config
from fedcl.session import GlobalEvaluator

pytestmark = pytest.mark.models


def _binary_file(tmp_path, n=60):
    path = tmp_path / "loans.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            bad = i % 3 == 0
            writer.writerow([f"applicant {i} " + ("missed payments " if bad else "paid on time ") * (1 + i % 4),
                             "bad" if bad else "good"])
    return path


def _evaluator(tmp_path, *extra):
    config = load_config(None, ["model.name=tiny-llama", f"data.path={_binary_file(tmp_path)}", "data.dataset=",
                                "data.test_fraction=0.5", "train.positive_label=bad",
                                "train.target_precision=0.5", "model.max_length=32", *extra])
    return GlobalEvaluator(config)


def _bad_scores(evaluator, records):
    task, model = evaluator.shared.task, evaluator.shared.model
    with torch.no_grad():
        probs = task.logits(model, task.encode(records)).softmax(dim=1)
    return probs[:, task.index["bad"]].tolist(), [int(r["label"] == "bad") for r in records]


def test_the_threshold_comes_from_the_validation_split_and_scores_the_test_split(tmp_path):
    evaluator = _evaluator(tmp_path)
    test, validation = evaluator.test, evaluator.validation
    whole = evaluator.shared.dataset.test
    assert validation and test and len(validation) + len(test) == len(whole)
    assert sorted(map(repr, validation + test)) == sorted(map(repr, whole))  # a split, no record twice
    assert {r["label"] for r in validation} == {"bad", "good"}  # stratified
    report = evaluator.evaluate(evaluator.initial_state)

    scores, truth = _bad_scores(evaluator, validation)
    _, expected = metrics.recall_at_precision(truth, scores, 0.5)
    assert report["threshold"] == pytest.approx(expected, abs=1e-6) and report["threshold_source"] == "validation"
    assert report["validation_records"] == len(validation) and report["num_examples"] == len(test)
    assert "threshold_at_precision" not in report  # a threshold chosen on the test split is never reported

    test_scores, test_truth = _bad_scores(evaluator, test)
    flagged = [s >= report["threshold"] for s in test_scores]
    hits = sum(f and t for f, t in zip(flagged, test_truth))
    assert report["recall_at_threshold"] == pytest.approx(hits / sum(test_truth))
    assert report["precision_at_threshold"] == pytest.approx(hits / sum(flagged) if any(flagged) else 0.0)
    accuracy = sum(int(f) == t for f, t in zip(flagged, test_truth)) / len(test)
    assert report["accuracy"] == pytest.approx(accuracy)


def test_an_unreachable_precision_falls_back_to_train_threshold_and_says_so(tmp_path):
    evaluator = _evaluator(tmp_path, "train.threshold=0.42")
    # a validation split without a single positive: no threshold reaches any precision there
    evaluator.validation = [r for r in evaluator.validation if r["label"] == "good"]
    report = evaluator.evaluate(evaluator.initial_state)
    assert report["threshold"] == 0.42 and report["threshold_source"] == "train.threshold"
    assert report["validation_recall_at_precision"] == 0.0


def test_no_validation_split_without_a_positive_class_or_when_turned_off(tmp_path):
    plain = GlobalEvaluator(load_config(None, ["model.name=tiny-llama", f"data.path={_binary_file(tmp_path)}",
                                               "data.dataset=", "model.max_length=32"]))
    assert plain.validation == [] and plain.test == plain.shared.dataset.test
    off = _evaluator(tmp_path, "train.threshold_validation=0")
    assert off.validation == [] and "threshold" not in off.evaluate(off.initial_state)


@pytest.mark.parametrize("bad", ["1", "-0.1", "nan"])
def test_threshold_validation_is_a_fraction(bad):
    with pytest.raises(ConfigError, match="train.threshold_validation"):
        load_config(None, [f"train.threshold_validation={bad}"])
