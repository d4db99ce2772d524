"""Tasks, local training, evaluation and metrics on a tiny model, in-process."""

from __future__ import annotations

import pytest
import torch

from fedcl import metrics
from fedcl.config import load_config
from fedcl.models import build_lora_model
from fedcl.tasks import ClassificationTask, InstructionTask, TaskError, make_task
from fedcl.train import evaluate, predict, sample_batches, train_local


@pytest.fixture(scope="module")
def tiny():
    config = load_config(None, ["model.name=tiny-llama", "model.max_length=32"])
    model, tokenizer = build_lora_model(config.model, config.lora)
    return config, model, tokenizer


def records(n, labels=("yes", "no")):
    return [{"text": f"record number {i} " + ("good " * (i % 5)), "label": labels[i % len(labels)],
             "meta": {}} for i in range(n)]


def test_classification_encoding_keeps_prompt_suffix_and_labels(tiny):
    config, model, tokenizer = tiny
    task = make_task("classification", tokenizer, ["no", "yes"], config.data, config.model, config.train)
    batch = task.encode([{"text": "word " * 200, "label": "yes"}, {"text": "short", "label": "no"}])
    assert batch.input_ids.shape[1] <= config.model.max_length
    # left padding: the last position of every row is the template's final token
    assert (batch.input_ids[:, -1] == task.suffix_ids[-1]).all()
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[:, -1].all()
    assert batch.targets.tolist() == [1, 0]
    assert len(set(task.label_token_ids)) == 2


def test_classification_logits_use_the_label_rows_of_the_lm_head(tiny):
    config, model, tokenizer = tiny
    task = ClassificationTask(tokenizer, ["no", "yes"], config.data, config.model, config.train)
    batch = task.encode(records(3))
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1, :]
        mine = task.logits(model, batch)
    assert torch.allclose(mine, full[:, task.label_token_ids], atol=1e-4)


@pytest.mark.parametrize("labels, message", [
    (["only"], "at least 2 labels"),
    (["a", "a a", "a a a"], "data.label_words"),  # three labels, two distinct tokens among them
])
def test_bad_label_sets_are_refused(tiny, labels, message):
    config, _, tokenizer = tiny
    with pytest.raises(TaskError, match=message):
        ClassificationTask(tokenizer, labels, config.data, config.model, config.train)


def test_unknown_label_in_a_batch_names_it(tiny):
    config, _, tokenizer = tiny
    task = ClassificationTask(tokenizer, ["no", "yes"], config.data, config.model, config.train)
    with pytest.raises(TaskError, match="'maybe'"):
        task.encode([{"text": "x", "label": "maybe"}])


def test_instruction_loss_covers_only_answer_tokens(tiny):
    config, model, tokenizer = tiny
    cfg = load_config(None, ["model.name=tiny-llama", "model.max_length=32", "data.task=instruction",
                             "data.dataset=headlines"])
    task = InstructionTask(tokenizer, cfg.data, cfg.model)
    batch = task.encode([{"prompt": "Say hi", "response": "hi there"},
                         {"prompt": "A much longer prompt " * 10, "response": "ok"}])
    answer = tokenizer("hi there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = batch.targets[0]
    assert row[row != -100].tolist() == answer
    assert batch.input_ids.shape[1] <= cfg.model.max_length
    assert task.token_counts(batch).tolist() == [len(answer) - 0, 2]
    losses = task.per_example_loss(model, batch)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    # changing a prompt token leaves the target set unchanged, changing the answer does not
    other = task.encode([{"prompt": "Say yo", "response": "hi there"}])
    assert other.targets[0][other.targets[0] != -100].tolist() == answer


def test_sample_batches_are_seeded_epochs():
    data = list(range(10))
    a = list(sample_batches(data, 4, 5, seed=1))
    assert a == list(sample_batches(data, 4, 5, seed=1))
    assert a != list(sample_batches(data, 4, 5, seed=2))
    flat = [x for batch in a for x in batch]
    assert sorted(flat[:10]) == data  # the first epoch covers every record once


def test_local_training_lowers_the_loss_and_changes_only_the_adapter(tiny):
    config, model, tokenizer = tiny
    cfg = config.replace({"train.lr": 0.01, "train.local_steps": 15, "train.batch_size": 4})
    task = make_task("classification", tokenizer, ["no", "yes"], cfg.data, cfg.model, cfg.train)
    data = records(16)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = evaluate(model, task, data, cfg.train, cfg.model)["loss"]
    result = train_local(model, task, data, cfg.train, cfg.model, seed=0)
    after = evaluate(model, task, data, cfg.train, cfg.model)["loss"]
    assert result.steps == 15 and result.examples == 60 and result.tokens > 0
    assert after < before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_binary_threshold_moves_the_decision(tiny):
    config, _, tokenizer = tiny
    task = ClassificationTask(tokenizer, ["bad", "good"], config.data, config.model, config.train)
    probs = torch.tensor([[0.45, 0.55], [0.35, 0.65], [0.7, 0.3]])
    default = config.train
    assert predict(task, probs, default) == [1, 1, 0]
    flag_bad = default.__class__(**{**default.__dict__, "positive_label": "bad", "threshold": 0.4})
    assert predict(task, probs, flag_bad) == [0, 1, 0]


def test_classification_report_worked_example():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 0]
    report = metrics.classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(3 / 6)
    assert report["majority_baseline"] == pytest.approx(3 / 6)
    a, b, c = (report["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3))
    assert (b["precision"], b["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (c["precision"], c["recall"]) == (0.0, 0.0)
    f1_a, f1_b = 2 * (0.5 * 2 / 3) / (0.5 + 2 / 3), 0.5
    assert report["macro_f1"] == pytest.approx((f1_a + f1_b + 0.0) / 3)


def test_language_model_report():
    r = metrics.language_model_report(total_loss=20.0, total_tokens=10, num_examples=3)
    assert r["loss"] == 2.0 and r["perplexity"] == pytest.approx(7.389, abs=1e-3)


# -- content-free calibration (data.calibrate) -------------------------------------

def _calibrated(extra=()):
    from fedcl.session import Shared

    config = load_config(None, ["model.name=tiny-llama", "model.max_length=32", "data.calibrate=true",
                                "data.max_records=40", *extra])
    return Shared.get(config)


def test_calibration_makes_the_empty_text_score_every_label_alike():
    shared = _calibrated()
    task, model = shared.task, shared.model
    assert task.offset is not None and task.offset.abs().max() > 1e-3  # a real prior was removed
    empty = task.encode([{"text": "", "label": task.labels[0]}])
    real = task.encode(shared.dataset.train[:4])
    with torch.no_grad():
        assert torch.allclose(task.logits(model, empty), torch.zeros(1, len(task.labels)), atol=1e-4)
        calibrated = task.logits(model, real)
        raw = task.scores(model, real)
    assert torch.allclose(calibrated, raw - task.offset, atol=1e-5)


def test_calibration_offset_comes_from_the_base_model_not_the_adapter():
    from fedcl import session

    first = _calibrated().task.offset.clone()
    model = _calibrated().model
    with torch.no_grad():  # a trained-looking adapter on the session's cached model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    session._content_free_offset.cache_clear()
    try:
        again = _calibrated().task.offset
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.zero_()
    assert torch.allclose(first, again, atol=1e-6)


# -- ranking figures of a binary task, against scikit-learn's --------------------------
RANKING_CASES = [
    # (labels, scores): ties across classes, a perfect ranking, a reversed one, a rare positive
    ([1, 0, 1, 1, 0, 0, 1, 0], [0.9, 0.8, 0.8, 0.6, 0.5, 0.5, 0.3, 0.1]),
    ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]),
    ([0] * 19 + [1], [i / 20 for i in range(20)]),
    ([1, 0, 1, 0, 1, 0], [0.5] * 6),
]


@pytest.mark.parametrize("y_true, scores", RANKING_CASES)
def test_ranking_figures_equal_scikit_learn(y_true, scores):
    sk = pytest.importorskip("sklearn.metrics")
    from fedcl.metrics import average_precision, roc_auc

    assert roc_auc(y_true, scores) == pytest.approx(sk.roc_auc_score(y_true, scores), abs=1e-12)
    assert average_precision(y_true, scores) == pytest.approx(sk.average_precision_score(y_true, scores),
                                                              abs=1e-12)


@pytest.mark.parametrize("target", [0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("y_true, scores", RANKING_CASES)
def test_recall_at_precision_is_the_best_recall_scikit_learn_finds(y_true, scores, target):
    sk = pytest.importorskip("sklearn.metrics")
    from fedcl.metrics import recall_at_precision

    precision, recall, thresholds = sk.precision_recall_curve(y_true, scores)
    reachable = [r for p, r in zip(precision[:-1], recall[:-1]) if p >= target]
    got, threshold = recall_at_precision(y_true, scores, target)
    assert got == pytest.approx(max(reachable, default=0.0))
    if threshold is not None:  # flagging at the threshold gives that recall at that precision
        flagged = [t for t, s in zip(y_true, scores) if s >= threshold]
        assert sum(flagged) / len(flagged) >= target
        assert sum(flagged) / sum(y_true) == pytest.approx(got)


def test_ranking_figures_without_one_class_are_undefined_not_zero():
    from fedcl.metrics import ranking_report

    report = ranking_report([0, 0, 0], [0.2, 0.5, 0.1], precision=0.9)
    assert report["roc_auc"] is None and report["average_precision"] is None
    assert report["recall_at_precision"] == 0.0 and report["threshold_at_precision"] is None
    with pytest.raises(ValueError, match="precision"):
        ranking_report([0, 1], [0.2, 0.5], precision=0.0)


def test_binary_evaluation_ranks_the_positive_class_and_keeps_it_off_the_wire(tiny):
    import dataclasses

    from fedcl.keys import RANKING, report_to_reply

    config, model, tokenizer = tiny
    task = ClassificationTask(tokenizer, ["bad", "good"], config.data, config.model, config.train)
    data = records(24, labels=("bad", "good"))
    flag_bad = dataclasses.replace(config.train, positive_label="bad", target_precision=0.6)
    report = evaluate(model, task, data, flag_bad, config.model)
    with torch.no_grad():
        probs = task.logits(model, task.encode(data)).softmax(dim=1)[:, 0].tolist()
    truth = [int(r["label"] == "bad") for r in data]
    assert report["roc_auc"] == pytest.approx(metrics.roc_auc(truth, probs), abs=1e-6)
    assert report["average_precision"] == pytest.approx(metrics.average_precision(truth, probs), abs=1e-6)
    assert report["target_precision"] == 0.6
    assert (report["recall_at_precision"], report["threshold_at_precision"]) == pytest.approx(
        metrics.recall_at_precision(truth, probs, 0.6), abs=1e-6)
    assert not set(RANKING) & set(report_to_reply(report))  # a client sends none of them
    plain = evaluate(model, task, data, config.train, config.model)  # no positive class: no ranking
    assert not set(RANKING) & set(plain)


def test_target_precision_must_be_a_precision():
    from fedcl.config import ConfigError

    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ConfigError, match="train.target_precision"):
            load_config(None, [f"train.target_precision={bad}"])


def test_evaluation_reports_progress_per_batch_and_the_same_figures(tiny):
    config, model, tokenizer = tiny
    task = make_task("classification", tokenizer, ["no", "yes"], config.data, config.model, config.train)
    recs, calls = records(10), []
    train_cfg = config.train.__class__(**{**config.train.__dict__, "eval_batch_size": 4})
    quiet = evaluate(model, task, recs, train_cfg, config.model)
    told = evaluate(model, task, recs, train_cfg, config.model, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 10), (8, 10)]  # after each batch but the last (the report follows it)
    assert told["accuracy"] == quiet["accuracy"] and told["loss"] == pytest.approx(quiet["loss"])


def test_the_servers_evaluation_progress_writes_a_line_naming_the_round(capsys):
    from fedcl.server.progress import RoundProgress

    bar = RoundProgress(3, 0)
    report = bar.evaluating(2, every=0.0)
    report(64, 1000)
    bar.close()
    written = capsys.readouterr()
    assert "server | round 2 | evaluating: 64 of 1000 records" in written.out + written.err
