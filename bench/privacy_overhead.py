"""DP-SGD cost: step time and peak memory of DP training over ordinary training.

    .venv/bin/python -m bench.privacy_overhead

For each task kind, ordinary and DP training run in fresh worker processes,
one after the other, on the default model and the same client's data; time
is compared per example processed (Poisson batches vary in size), memory as
the peak resident set size of the worker. Writes bench/results/privacy_overhead.json.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = {
    "classification": ["data.dataset=drugreview-condition"],
    "instruction": ["data.dataset=headlines", "data.task=instruction", "data.max_records=400",
                    "data.max_test_records=16"],
}
STEPS = 4


def worker(kind: str, private: bool, model: str) -> dict:
    """Runs in its own process: one warm-up round, then a measured one."""
    import torch

    from fedcl.config import load_config
    from fedcl.privacy.accounting import sample_plan
    from fedcl.privacy.dpsgd import train_private
    from fedcl.session import LocalSession
    from fedcl.train import train_local

    config = load_config(None, CASES[kind] + [f"model.name={model}", "model.threads=2",
                                              f"train.local_steps={STEPS}", "privacy.noise_multiplier=1.0"])
    torch.set_num_threads(2)
    session = LocalSession(config, 0, config.federation.clients)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = session.train_records

    def run(steps: int):
        cfg = config.replace({"train.local_steps": steps, "federation.rounds": 1})
        if private:
            plan = sample_plan(cfg, len(records))
            return train_private(session.model, session.shared.task, records, cfg.train, cfg.model, plan)
        return train_local(session.model, session.shared.task, records, cfg.train, cfg.model, seed=0)

    run(1)
    result = run(STEPS)
    return {"kind": kind, "private": private, "steps": result.steps, "examples": result.examples,
            "seconds": result.seconds, "seconds_per_example": result.seconds / max(result.examples, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": loaded_rss / 1024}


RESULT = "privacy_overhead.json"


def render(r: dict) -> list[str]:
    lines = [f"## DP-SGD overhead ({r['model']}, {r['steps']} steps, measured {r['when']})", "",
             "Ordinary and DP training of the same client, each in a fresh process. Time per example "
             "processed (Poisson batches vary in size); memory as peak resident set size.", "",
             "| task | time per example, plain | DP | time ratio (goal <= 1.2) | peak RSS plain MB | DP MB "
             "| memory ratio (goal <= 1.2) |", "|---|---|---|---|---|---|---|"]
    for kind, s in r["summary"].items():
        plain = next(x for x in r["rows"] if x["kind"] == kind and not x["private"])
        dp = next(x for x in r["rows"] if x["kind"] == kind and x["private"])
        lines.append(f"| {kind} | {plain['seconds_per_example']:.3f} s | {dp['seconds_per_example']:.3f} s "
                     f"| {s['time_ratio']:.2f}x | {plain['peak_rss_mb']:.0f} | {dp['peak_rss_mb']:.0f} "
                     f"| {s['memory_ratio']:.2f}x |")
    return lines + [""]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3] == "dp", sys.argv[4])))
        return
    model = "tiny-llama" if "--quick" in sys.argv else "smollm2-135m"
    rows = []
    for kind in CASES:
        for mode in ("plain", "dp"):
            out = subprocess.run([sys.executable, "-m", "bench.privacy_overhead", "--worker", kind, mode, model],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = {}
    for kind in CASES:
        plain, dp = (next(r for r in rows if r["kind"] == kind and r["private"] == p) for p in (False, True))
        summary[kind] = {"time_ratio": dp["seconds_per_example"] / plain["seconds_per_example"],
                         "memory_ratio": dp["peak_rss_mb"] / plain["peak_rss_mb"]}
    RESULTS.mkdir(exist_ok=True)
    result = {"model": model, "when": time.strftime("%Y-%m-%d %H:%M"), "steps": STEPS, "rows": rows,
              "summary": summary}
    (RESULTS / "privacy_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
