"""`fedcl plan`'s memory estimate against the measured peak memory of training steps on the CPU.

    .venv/bin/python -m bench.plan            # every case (a few minutes at one thread)
    .venv/bin/python -m bench.plan --quick    # tiny-llama only, to check the script

Each case runs in a fresh process with one torch thread: it imports
everything, loads the data and the tokenizer, and reads its resident memory
(the baseline). It then builds the model with its LoRA adapter (as a client
does), resets the kernel's peak-RSS mark (/proc/self/clear_refs), runs two
local training steps (the second holds AdamW's state, as every later step
does) and reads the peak (VmHWM). Measured = peak - baseline: the weights,
the adapter and everything the steps allocated, as the estimate counts them;
a transient of loading the weights (before the reset) is not in it.
tracemalloc does not see torch's allocations, hence RSS. DP cases use
micro-batches of train.batch_size rows, so a Poisson batch larger than its
expectation is processed in passes no larger than the planned one.
Results are written after every case to bench/results/plan.json.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GOAL = 0.25  # |estimate / measured - 1|
COMMON = ["model.threads=1", "model.device=cpu", "federation.clients=1", "data.max_records=200",
          "data.eval_fraction=0", "train.local_steps=2", "train.seed=0"]
DP = ["privacy.noise_multiplier=1.0", "train.micro_batch_size={batch}"]
# (model, batch, max_length, extra settings). The tiny models at 8 x 64 are mostly
# their 33 MB embedding; at 64 x 128 activations dominate.
CASES = [
    ("smollm2-135m", 8, 64, []), ("smollm2-135m", 8, 64, DP), ("smollm2-135m", 8, 64, ["lora.top_layers=2"]),
    ("smollm2-135m", 16, 128, []),
    ("tiny-llama", 8, 64, []), ("tiny-llama", 8, 64, DP), ("tiny-qwen2", 8, 64, []),
    ("tiny-deepseek-v2", 8, 64, []), ("tiny-deepseek-v3", 8, 64, []), ("tiny-deepseek-v3", 8, 64, DP),
    ("tiny-llama", 64, 128, []), ("tiny-llama", 64, 128, DP),
]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def settings(model: str, batch: int, length: int, extra: list[str]) -> list[str]:
    return COMMON + [f"model.name={model}", f"train.batch_size={batch}", f"model.max_length={length}"] + \
        [s.format(batch=batch) for s in extra]


def worker(overrides: list[str]) -> dict:
    """One case in this process: baseline, model, two steps, peak."""
    import torch

    torch.set_num_threads(1)
    from fedcl import models
    from fedcl.config import load_config
    from fedcl.plan import plan_run
    from fedcl.privacy import sample_plan
    from fedcl.session import LocalSession, dataset_for

    config = load_config(None, overrides)
    plan = plan_run(config)
    dataset_for(config.data, config.train.seed)
    if config.model.name.startswith("tiny-"):
        models._deepseek_tokenizer()  # the tokenizer is no part of the estimate
    else:
        from transformers import AutoTokenizer

        from fedcl import gguf_cache

        AutoTokenizer.from_pretrained(gguf_cache.converted_folder(models._smollm2_path()))
    if plan.dp:
        import opacus  # noqa: F401  (imported on first DP step: a module, not the step's memory)
    baseline = _status("VmRSS")
    session = LocalSession(config, 0, 1)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    dp_plan = sample_plan(config, len(session.train_records)) if plan.dp else None
    start = time.perf_counter()
    _, result = session.train(session.shared.initial_state, 1, dp_plan=dp_plan)
    peak = _status("VmHWM")
    # Batches are padded to their longest record: plan at the length the steps ran at.
    # (After the peak: under lora.top_layers encoding computes frozen states.)
    longest = session.shared.task.encode(session.train_records).input_ids.shape[1]
    if longest < config.model.max_length:
        plan = plan_run(config.replace({"model.max_length": max(8, longest)}))
    return {"settings": overrides, "model": config.model.name, "dp": plan.dp,
            "top_layers": config.lora.top_layers, "batch": config.train.batch_size,
            "max_length": config.model.max_length, "padded_length": longest, "tokens_seen": result.tokens,
            "steps": result.steps, "seconds": round(time.perf_counter() - start, 2),
            "measured_bytes": peak - baseline, "estimate_bytes": plan.client_bytes,
            "estimate_parts": plan.memory, "ratio": round(plan.client_bytes / (peak - baseline), 3)}


def render(rows: list[dict]) -> list[str]:
    """Table rows; the estimate without and with the CPU allocator's share ("allocator" part)."""
    lines = ["| model | batch x tokens | DP | top layers | autograd estimate MB | with allocator MB | "
             "measured MB | with allocator / measured |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {' '.join(r['settings'])} | error: {r['error'][:80]} ||||||")
            continue
        parts = r["estimate_parts"]
        without = sum(v for k, v in parts.items() if k != "allocator")
        with_allocator = without + parts.get("allocator", parts["activations"])
        ratio = with_allocator / r["measured_bytes"]
        ok = "" if abs(ratio - 1) <= GOAL else " (outside 25%)"
        lines.append(f"| {r['model']} | {r['batch']} x {r['padded_length']} | {'on' if r['dp'] else 'off'} | "
                     f"{r['top_layers'] or 'all'} | {without / 1e6:.1f} | {with_allocator / 1e6:.1f} | "
                     f"{r['measured_bytes'] / 1e6:.1f} | {ratio:.2f}{ok} |")
    return lines


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    quick = "--quick" in sys.argv
    cases = [c for c in CASES if c[0] == "tiny-llama"] if quick else CASES
    path = RESULTS / ("plan_quick.json" if quick else "plan.json")
    result = {"how": "python -m bench.plan: one fresh process per case, 1 torch thread, float32 on the CPU; "
                     "measured = peak RSS (VmHWM, reset after the model is built) - RSS before the model",
              "machine": platform.processor() or platform.machine(), "goal": GOAL,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    for case in cases:
        overrides = settings(*case)
        out = subprocess.run([sys.executable, "-m", "bench.plan", "--worker", json.dumps(overrides)],
                             capture_output=True, text=True, env={**os.environ, **env})
        try:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"settings": overrides, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
        result["rows"].append(row)
        print("\n".join(render([row])[2:]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")  # kept after every case
    print("\n".join(render(result["rows"])))


if __name__ == "__main__":
    main()
