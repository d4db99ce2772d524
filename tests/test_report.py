"""Tests of fedcl.ops.report: the PNG curves of a run folder, and its errors.

The run folders here are written by hand in the schema `fedcl.rundir`
writes; the report only reads metrics.json, so no federation needs to run.
"""

from __future__ import annotations

import json
import re

import pytest

from fedcl.ops.cli import main
from fedcl.ops.report import (
    ReportError,
    accuracy_figure,
    bytes_figure,
    eval_points,
    loss_figure,
    mean_train_loss,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["accuracy.png", "loss.png", "bytes.png"]


def classification_eval(accuracy: float, macro_f1: float, loss: float) -> dict:
    return {"accuracy": accuracy, "macro_f1": macro_f1, "majority_baseline": 0.65, "num_examples": 40,
            "loss": loss, "per_class": {"pos": {"precision": 0.7, "recall": 0.9, "f1": 0.79, "support": 26}}}


def client(cid: int, num_examples: int, train_loss: float) -> dict:
    return {"id": cid, "num_examples": num_examples, "train_loss": train_loss, "train_steps": 8}


def round_record(rnd: int, ev: dict, clients: list[dict], up: int, down: int) -> dict:
    return {"round": rnd, "bytes_up": up, "bytes_down": down, "clients": clients, "failures": 0,
            "eval": ev, "federated_eval": {"accuracy": 0.5, "loss": 1.0}}


CLASSIFICATION = {
    "model": {"name": "tiny-llama", "base_bytes": 33_391_872, "adapter_bytes": 28_672},
    "initial_eval": classification_eval(0.25, 0.13, 1.13),
    "rounds": [
        round_record(1, classification_eval(0.625, 0.34, 0.97),
                     [client(0, 30, 1.0), client(1, 10, 2.0)], up=2_000_000, down=1_500_000),
        round_record(2, classification_eval(0.65, 0.26, 0.87),
                     [client(0, 32, 0.8), client(1, 32, 0.9)], up=2_000_000, down=2_000_000),
    ],
}

INSTRUCTION = {
    "model": {"name": "tiny-llama", "base_bytes": 1, "adapter_bytes": 1},
    "rounds": [
        round_record(r, {"loss": loss, "perplexity": ppl, "num_examples": 8},
                     [client(0, 8, loss + 0.5)], up=50_000, down=50_000)
        for r, loss, ppl in ((1, 3.0, 20.1), (2, 2.5, 12.2), (3, 2.2, 9.0))
    ],
}


def run_folder(tmp_path, metrics, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.toml").write_text("[federation]\nrounds = 2\n", encoding="utf-8")
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (run / "metrics.json").write_text(text, encoding="utf-8")
    return run


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # a drawn figure, not an empty canvas


def line_data(fig, label: str) -> tuple[list, list]:
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() == label:
                return list(line.get_xdata()), list(line.get_ydata())
    raise KeyError(label)


# -- writing ---------------------------------------------------------------------------

@pytest.mark.parametrize("metrics", [CLASSIFICATION, INSTRUCTION], ids=["classification", "instruction"])
def test_writes_three_pngs(tmp_path, metrics):
    run = run_folder(tmp_path, metrics)
    written = write_report(run)
    assert written == [run / "report" / name for name in NAMES]
    for path in written:
        assert_png(path)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(NAMES)


def test_pngs_get_the_usual_file_mode(tmp_path):
    # The temporary file must not hand a private (0600) mode to the PNG.
    run = run_folder(tmp_path, INSTRUCTION)
    usual = (run / "config.toml").stat().st_mode
    assert [path.stat().st_mode for path in write_report(run)] == [usual] * 3


def test_rewrite_replaces_files(tmp_path):
    run = run_folder(tmp_path, CLASSIFICATION)
    write_report(run)
    (run / "report" / "loss.png").write_bytes(b"stale")
    write_report(run)
    assert_png(run / "report" / "loss.png")
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(NAMES)


# -- what the figures show -------------------------------------------------------------

def test_eval_points_start_at_round_zero_when_present():
    assert [rnd for rnd, _ in eval_points(CLASSIFICATION)] == [0, 1, 2]
    assert [rnd for rnd, _ in eval_points(INSTRUCTION)] == [1, 2, 3]


def test_accuracy_figure_classification():
    fig = accuracy_figure(CLASSIFICATION)
    assert line_data(fig, "accuracy") == ([0, 1, 2], [0.25, 0.625, 0.65])
    assert line_data(fig, "macro-F1") == ([0, 1, 2], [0.13, 0.34, 0.26])
    baseline = next(line for line in fig.axes[0].get_lines() if line.get_label() == "majority baseline")
    assert baseline.get_linestyle() == "--"
    assert list(baseline.get_ydata()) == [0.65, 0.65]


def test_accuracy_figure_lm_shows_loss_and_perplexity():
    fig = accuracy_figure(INSTRUCTION)
    assert line_data(fig, "eval loss") == ([1, 2, 3], [3.0, 2.5, 2.2])
    assert line_data(fig, "perplexity") == ([1, 2, 3], [20.1, 12.2, 9.0])


def test_mean_train_loss_weights_by_examples():
    # Round 1: (30 * 1.0 + 10 * 2.0) / 40 = 1.25; round 2: (0.8 + 0.9) / 2.
    rounds, values = mean_train_loss(CLASSIFICATION)
    assert rounds == [1, 2]
    assert values == pytest.approx([1.25, 0.85])


def test_mean_train_loss_skips_rounds_without_clients():
    metrics = {"rounds": [{"round": 1, "clients": []},
                          {"round": 2, "clients": [client(0, 0, 2.0), client(1, 0, 4.0)]}]}
    assert mean_train_loss(metrics) == ([2], [3.0])


def test_loss_figure():
    fig = loss_figure(CLASSIFICATION)
    assert line_data(fig, "global eval loss") == ([0, 1, 2], [1.13, 0.97, 0.87])
    rounds, values = line_data(fig, "mean client training loss")
    assert rounds == [1, 2] and values == pytest.approx([1.25, 0.85])


def test_bytes_figure_in_megabytes():
    fig = bytes_figure(CLASSIFICATION)
    up, down = fig.axes[0].containers
    assert [bar.get_height() for bar in up] == [2.0, 2.0]
    assert [bar.get_height() for bar in down] == [1.5, 2.0]


# -- errors ----------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(ReportError, match="^" + re.escape(f"{tmp_path / 'nope'}: no such folder")):
        write_report(tmp_path / "nope")


def test_folder_without_metrics(tmp_path):
    with pytest.raises(ReportError, match="^" + re.escape(f"{tmp_path}: not a fedcl run folder")):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("text,problem", [
    ('{"rounds": [', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"model": {}, "rounds": []}', "no completed rounds"),
    ('{"model": {}}', "expected an object with a 'rounds' list"),
    ("[1, 2]", "expected an object with a 'rounds' list"),
    ('{"rounds": [{"eval": {}}]}', r"rounds\[0\] has no integer 'round'"),
])
def test_bad_metrics_name_the_file(tmp_path, text, problem):
    run = run_folder(tmp_path, text)
    with pytest.raises(ReportError, match="^" + re.escape(f"{run / 'metrics.json'}: ") + problem):
        write_report(run)
    assert not (run / "report").exists()


def test_report_error_is_a_value_error():
    assert issubclass(ReportError, ValueError)


# -- through the command line ------------------------------------------------------------

def test_cli_report_prints_paths(tmp_path, capsys):
    run = run_folder(tmp_path, CLASSIFICATION)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report" / name) for name in NAMES]


def test_cli_report_error_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedcl: error: ReportError: ")
    assert str(tmp_path) in err and "no metrics.json" in err
