"""The short table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path


def summary_rows(metrics: dict) -> list[tuple]:
    rows = []
    initial = metrics.get("initial_eval")
    if initial:
        rows.append((0, initial, 0, 0))
    for record in metrics.get("rounds", []):
        rows.append((record["round"], record.get("eval", {}), record.get("bytes_up", 0),
                     record.get("bytes_down", 0)))
    return rows


def print_summary(metrics: dict, run_dir: Path) -> None:
    rows = summary_rows(metrics)
    if not rows:
        return
    classification = "accuracy" in rows[-1][1]
    head = ("round", "accuracy", "macro-F1", "majority", "MB up", "MB down") if classification \
        else ("round", "loss", "perplexity", "MB up", "MB down")
    print()
    print("  ".join(f"{h:>10}" for h in head))
    for rnd, ev, up, down in rows:
        if classification:
            cells = (rnd, f"{ev.get('accuracy', 0):.3f}", f"{ev.get('macro_f1', 0):.3f}",
                     f"{ev.get('majority_baseline', 0):.3f}", f"{up / 1e6:.2f}", f"{down / 1e6:.2f}")
        else:
            cells = (rnd, f"{ev.get('loss', 0):.3f}", f"{ev.get('perplexity', 0):.1f}",
                     f"{up / 1e6:.2f}", f"{down / 1e6:.2f}")
        print("  ".join(f"{c:>10}" for c in cells))
    model = metrics.get("model", {})
    if model.get("base_bytes"):
        print(f"\nadapter {model.get('adapter_bytes', 0) / 1e6:.2f} MB vs base model "
              f"{model['base_bytes'] / 1e6:.1f} MB; run folder: {run_dir}")
