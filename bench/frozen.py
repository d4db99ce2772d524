"""Training only the top k layers: examples per second and accuracy against all layers.

    .venv/bin/python -m bench.frozen            # the default model (SmolLM2-135M, 30 layers)
    .venv/bin/python -m bench.frozen --quick    # tiny-llama, to check the script

One client trains centrally on the same records for the same epochs at
lora.top_layers = 0 (all layers), 4, 2 and 1, each in a fresh process with one
torch thread, one after the other. The clock runs from the first training
step to the last, so building the frozen bottom's states (on first use of a
record) is inside it; the evaluation on the test split runs after, through
the same path. Results are written after every run to bench/results/frozen.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RESULT = "frozen.json"
TOP_LAYERS = (0, 4, 2, 1)
EPOCHS = 10
# Five ICD-10-CM chapters, 240 training and 320 test records: all layers for 10
# epochs stays within minutes on one core.
SETTINGS = ["data.dataset=icd10-chapters", "data.labels=injury,musculoskeletal,circulatory,tumor,digestive",
            "data.max_records=240", "data.max_test_records=320", "model.threads=1", "train.batch_size=8",
            "train.lr=2e-3", "train.seed=0", "federation.clients=1", "data.eval_fraction=0"]
GOAL_SPEEDUP, GOAL_POINTS = 8.0, 0.01


def worker(model: str, top_layers: int) -> dict:
    """One run in this process: train EPOCHS over the client's records, then evaluate."""
    import torch

    from fedcl.config import load_config
    from fedcl.session import LocalSession
    from fedcl.train import evaluate, train_local

    torch.set_num_threads(1)
    config = load_config(None, SETTINGS + [f"model.name={model}", f"lora.top_layers={top_layers}"])
    session = LocalSession(config, 0, 1)
    records = session.train_records
    steps = EPOCHS * len(records) // config.train.batch_size
    train_cfg = config.train.__class__(**{**config.train.__dict__, "local_steps": steps})
    started = time.perf_counter()
    result = train_local(session.model, session.shared.task, records, train_cfg, config.model, seed=0)
    seconds = time.perf_counter() - started
    test = session.shared.dataset.test
    started = time.perf_counter()
    report = evaluate(session.model, session.shared.task, test, config.train, config.model)
    return {"top_layers": top_layers, "layers": len(session.model.base_model.model.model.layers),
            "train_records": len(records), "test_records": len(test), "steps": result.steps,
            "examples": result.examples, "train_seconds": seconds,
            "examples_per_second": result.examples / seconds, "final_loss": result.loss,
            "eval_seconds": time.perf_counter() - started, "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"], "majority": report["majority_baseline"]}


def render(r: dict) -> list[str]:
    rows = {row["top_layers"]: row for row in r["rows"]}
    lines = [f"## Training only the top layers ({r['model']}, measured {r['when']})", "",
             f"Settings: `{' '.join(r['settings'])}`, `model.name={r['model']}`; one client, "
             f"{EPOCHS} epochs over the same records at each `lora.top_layers` (0: all layers), each "
             "run in a fresh process with one torch thread, one after another on a machine shared with "
             "other work. Examples per second count the whole training run, building the frozen "
             "bottom's states included; accuracy is on the test split after the last epoch. "
             "The learning rate is the default, the same for every row, not tuned; one seed.", "",
             "| top layers | examples/s | speed-up | accuracy | macro-F1 | training s |",
             "|---|---|---|---|---|---|"]
    base = rows.get(0)
    for k in sorted(rows, key=lambda k: (k != 0, -k)):
        row = rows[k]
        speedup = row["examples_per_second"] / base["examples_per_second"] if base else float("nan")
        lines.append(f"| {'all ' + str(row['layers']) if k == 0 else k} | {row['examples_per_second']:.2f} "
                     f"| {speedup:.1f}x | {row['accuracy']:.3f} | {row['macro_f1']:.3f} "
                     f"| {row['train_seconds']:.0f} |")
    if base and 2 in rows:
        two = rows[2]
        speedup = two["examples_per_second"] / base["examples_per_second"]
        points = base["accuracy"] - two["accuracy"]
        verdict = "met" if speedup >= GOAL_SPEEDUP and points <= GOAL_POINTS else "not met"
        lines += ["", f"Goal (k = 2: at least {GOAL_SPEEDUP:.0f}x the examples per second of all layers, "
                  f"accuracy within {GOAL_POINTS * 100:.0f} point): {speedup:.1f}x, "
                  f"{-points * 100:+.1f} points: **{verdict}**. Majority class {base['majority']:.3f}."]
    if r.get("note"):
        lines += ["", r["note"]]
    return lines + [""]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
        return
    model = "tiny-llama" if "--quick" in sys.argv else "smollm2-135m"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (RESULT if model == "smollm2-135m" else "frozen_quick.json")
    result = {"model": model, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "settings": SETTINGS, "epochs": EPOCHS, "rows": []}
    for k in TOP_LAYERS if model == "smollm2-135m" else (0, 1):  # the tiny model has 2 layers
        out = subprocess.run([sys.executable, "-m", "bench.frozen", "--worker", model, str(k)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"top_layers={k} failed:\n{out.stderr[-3000:]}")
        result["rows"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(result["rows"][-1], flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")  # kept after every run
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
