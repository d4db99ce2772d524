"""The short table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from fedcl import keys


def summary_rows(metrics: dict) -> list[tuple]:
    rows = []
    initial = metrics.get(keys.INITIAL_EVAL)
    if initial:
        rows.append((0, initial, 0, 0))
    for record in metrics.get(keys.ROUNDS, []):
        rows.append((record[keys.ROUND], record.get(keys.EVAL, {}), record.get(keys.BYTES_UP, 0),
                     record.get(keys.BYTES_DOWN, 0)))
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
            cells = (rnd, f"{ev.get(keys.ACCURACY, 0):.3f}", f"{ev.get(keys.MACRO_F1, 0):.3f}",
                     f"{ev.get(keys.MAJORITY, 0):.3f}", f"{up / 1e6:.2f}", f"{down / 1e6:.2f}")
        else:
            cells = (rnd, f"{ev.get(keys.LOSS, 0):.3f}", f"{ev.get(keys.PERPLEXITY, 0):.1f}",
                     f"{up / 1e6:.2f}", f"{down / 1e6:.2f}")
        print("  ".join(f"{c:>10}" for c in cells))
    model = metrics.get(keys.MODEL, {})
    if model.get("base_bytes"):
        print(f"\nadapter {model.get('adapter_bytes', 0) / 1e6:.2f} MB vs base model "
              f"{model['base_bytes'] / 1e6:.1f} MB; run folder: {run_dir}")
