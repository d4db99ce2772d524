"""A run's curves as PNG files: `fedcl report RUN_DIR` writes them to RUN_DIR/report/.

`write_report` reads only `metrics.json` (see `fedcl.rundir` for the run
folder layout) and draws one figure per question a reader asks of a run:

    accuracy.png   how good is the global adapter, round by round (for an
                   instruction task: its eval loss and perplexity)
    loss.png       global eval loss next to the clients' mean training loss
    bytes.png      what travelled per round, up and down, in MB

and, for a continual-learning run (metrics.json has a ``continual`` section):

    accuracy_matrix.png    R[k][j], accuracy on task j after training task k
    task_accuracy.png      each task's accuracy as the stream goes on

Each figure is a small function taking the parsed metrics and returning a
matplotlib Figure; `FIGURES` lists them, `continual_figures` the continual ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from fedcl import keys


class ReportError(ValueError):
    """The folder is not a run folder, or its metrics cannot be drawn; the message names the path."""


REPORT_DIR = "report"


# -- reading ------------------------------------------------------------------

def load_metrics(run_dir: Path) -> dict:
    """The run's parsed metrics.json, checked to hold at least one completed round."""
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such folder; expected a fedcl run folder")
    if not path.is_file():
        raise ReportError(f"{run_dir}: not a fedcl run folder (no metrics.json)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get(keys.ROUNDS), list):
        raise ReportError(f"{path}: expected an object with a 'rounds' list")
    if not metrics[keys.ROUNDS]:
        raise ReportError(f"{path}: no completed rounds yet; nothing to draw")
    for index, record in enumerate(metrics[keys.ROUNDS]):
        if not isinstance(record, dict) or not isinstance(record.get(keys.ROUND), int):
            raise ReportError(f"{path}: rounds[{index}] has no integer 'round'")
    return metrics


def eval_points(metrics: dict) -> list[tuple[int, dict]]:
    """(round, global eval) pairs, round 0 first when the run evaluated before training."""
    points = []
    if metrics.get(keys.INITIAL_EVAL):
        points.append((0, metrics[keys.INITIAL_EVAL]))
    points.extend((r[keys.ROUND], r.get(keys.EVAL) or {}) for r in metrics[keys.ROUNDS])
    return points


def series(points: list[tuple[int, dict]], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of `key`, skipping rounds that lack it."""
    pairs = [(rnd, float(ev[key])) for rnd, ev in points if ev.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def is_classification(metrics: dict) -> bool:
    return any(keys.ACCURACY in ev for _, ev in eval_points(metrics))


def mean_train_loss(metrics: dict) -> tuple[list[int], list[float]]:
    """Per round, the clients' training loss averaged with their example counts as weights."""
    rounds, values = [], []
    for record in metrics[keys.ROUNDS]:
        clients = [c for c in record.get(keys.CLIENTS) or [] if c.get("train_loss") is not None]
        if not clients:
            continue
        weights = [max(int(c.get(keys.NUM_EXAMPLES) or 0), 0) for c in clients]
        total = sum(weights)
        if total == 0:
            weights, total = [1] * len(clients), len(clients)
        rounds.append(record[keys.ROUND])
        values.append(sum(w * float(c["train_loss"]) for w, c in zip(weights, clients)) / total)
    return rounds, values


# -- figures ------------------------------------------------------------------

def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_figure(metrics: dict):
    """Accuracy and macro-F1 per round against the majority baseline; LM tasks: loss and perplexity."""
    points = eval_points(metrics)
    if not is_classification(metrics):
        return _lm_quality_figure(points)
    fig, ax = _figure("Global accuracy", "score")
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        rounds, values = series(points, key)
        ax.plot(rounds, values, marker="o", label=label)
    rounds, baseline = series(points, "majority_baseline")
    if baseline:
        # The baseline depends only on the test split, so one level is drawn.
        ax.axhline(baseline[-1], linestyle="--", color="grey", label="majority baseline")
    ax.set_ylim(0.0, 1.0)
    _integer_rounds(ax)
    ax.legend(loc="best")
    return fig


def _lm_quality_figure(points: list[tuple[int, dict]]):
    fig, ax = _figure("Global eval loss and perplexity", "eval loss")
    rounds, loss = series(points, "loss")
    ax.plot(rounds, loss, marker="o", color="C0", label="eval loss")
    rounds, ppl = series(points, "perplexity")
    if ppl:
        twin = ax.twinx()
        twin.plot(rounds, ppl, marker="s", color="C1", label="perplexity")
        twin.set_ylabel("perplexity")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="best")
    else:
        ax.legend(loc="best")
    _integer_rounds(ax)
    return fig


def loss_figure(metrics: dict):
    """Global eval loss and the clients' mean training loss per round."""
    fig, ax = _figure("Loss", "loss")
    rounds, values = series(eval_points(metrics), "loss")
    ax.plot(rounds, values, marker="o", label="global eval loss")
    rounds, values = mean_train_loss(metrics)
    ax.plot(rounds, values, marker="s", label="mean client training loss")
    _integer_rounds(ax)
    ax.legend(loc="best")
    return fig


def bytes_figure(metrics: dict):
    """Bytes sent to the server (up) and to the clients (down) per round, in MB."""
    fig, ax = _figure("Communication per round", "MB")
    rounds = [r[keys.ROUND] for r in metrics[keys.ROUNDS]]
    up = [float(r.get(keys.BYTES_UP) or 0) / 1e6 for r in metrics[keys.ROUNDS]]
    down = [float(r.get(keys.BYTES_DOWN) or 0) / 1e6 for r in metrics[keys.ROUNDS]]
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], up, width=width, label="up (clients to server)")
    ax.bar([x + width / 2 for x in rounds], down, width=width, label="down (server to clients)")
    _integer_rounds(ax)
    ax.legend(loc="best")
    return fig


# File name -> function drawing it; every run gets these.
FIGURES: dict[str, Callable[[dict], object]] = {
    "accuracy.png": accuracy_figure,
    "loss.png": loss_figure,
    "bytes.png": bytes_figure,
}


def accuracy_matrix_figure(metrics: dict):
    """Heatmap of the accuracy matrix: rows the task just trained, columns the task tested."""
    from matplotlib.figure import Figure

    section = metrics[keys.CONTINUAL]
    names, matrix = section["tasks"], section["accuracy_matrix"]
    fig = Figure(figsize=(1.2 + 0.6 * len(names), 1.0 + 0.5 * max(len(matrix), 1)), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), names[:len(matrix)])
    ax.set_xlabel("tested on task")
    ax.set_ylabel("after training task")
    ax.set_title(f"Accuracy matrix ({section.get('strategy', '')})")
    if len(names) <= 12:  # values stay legible up to about a dozen tasks
        for k, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, k, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
    return fig


def task_accuracy_figure(metrics: dict):
    """Each task's accuracy after every finished task (x: tasks trained so far; 0 = zero-shot)."""
    section = metrics[keys.CONTINUAL]
    names, matrix, zero = section["tasks"], section["accuracy_matrix"], section.get("zero_shot")
    fig, ax = _figure("Accuracy per task over the stream", "accuracy")
    ax.set_xlabel("tasks trained")
    start = 0 if zero else 1
    rows = ([zero] if zero else []) + list(matrix)
    for j, name in enumerate(names):
        ax.plot(range(start, start + len(rows)), [row[j] for row in rows], marker="o", label=name)
    ax.set_ylim(0.0, 1.0)
    _integer_rounds(ax)
    ax.legend(loc="best", fontsize=7, ncol=2)
    return fig


def continual_figures(metrics: dict) -> dict[str, Callable[[dict], object]]:
    """Figures for continual-learning runs (none for an ordinary run or before a task finished)."""
    section = metrics.get(keys.CONTINUAL) or {}
    if not section.get("accuracy_matrix"):
        return {}
    return {"accuracy_matrix.png": accuracy_matrix_figure, "task_accuracy.png": task_accuracy_figure}


# -- writing ------------------------------------------------------------------

def save_png(fig, path: Path) -> None:
    """Save `fig` to `path` atomically: readers see the old file or the new one, never half."""
    # A plain temp name (not mkstemp, whose 0600 mode would stick to the PNG) in the same folder,
    # so that os.replace is a rename on one file system.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(run_dir: Path) -> list[Path]:
    """Draw the run's figures into RUN_DIR/report/; return the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    written = []
    for name, draw in {**FIGURES, **continual_figures(metrics)}.items():
        save_png(draw(metrics), out / name)
        written.append(out / name)
    return written
