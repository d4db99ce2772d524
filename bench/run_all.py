"""`make bench`: run every benchmark, then write BENCHMARKS.md from the results.

    .venv/bin/python -m bench.run_all            # run, then render
    .venv/bin/python -m bench.run_all --render   # only render existing results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = ["bench.foundation", "bench.privacy_overhead"]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_foundation(r: dict) -> list[str]:
    sim, fp32, bf16 = r["simulation"], r["training"][0], r["training"][1]
    peak = r["peak_gflops"]
    lines = [
        f"## Foundation ({r['model']}, measured {r['when']})", "",
        "| what | measured | goal | met |", "|---|---|---|---|",
        f"| bytes per client per round / base model bytes | {_pct(sim['max_bytes_per_client_over_base'])} "
        f"({sim['rounds'][-1]['bytes_up_per_client'] / 1e6:.2f} MB vs {sim['base_bytes'] / 1e6:.1f} MB) "
        f"| <= 0.5% | {'yes' if sim['max_bytes_per_client_over_base'] <= 0.005 else 'no'} |",
        f"| training throughput, float32, 2 threads | {fp32['tokens_per_second']:.0f} tokens/s, "
        f"{fp32['achieved_gflops']:.1f} GFLOP/s = {_pct(fp32['fraction_of_peak'])} of the float32 matmul peak "
        f"({peak['float32_2_threads']:.0f} GFLOP/s) | >= 50% of peak "
        f"| {'yes' if fp32['fraction_of_peak'] >= 0.5 else 'no'} |",
        f"| training throughput, bfloat16 autocast | {bf16['tokens_per_second']:.1f} tokens/s, "
        f"{bf16['achieved_gflops']:.1f} GFLOP/s (bf16 matmul peak here: {peak['bfloat16_2_threads']:.1f} GFLOP/s) "
        f"| - | - |",
        f"| Flower's share of a round (steady state) | {_pct(sim['steady_flower_share'])} | < 10% "
        f"| {'yes' if sim['steady_flower_share'] < 0.10 else 'no'} |",
        f"| time to the first round (command start to round 1 committed) "
        f"| {sim['time_to_first_round_seconds']:.0f} s | - | - |", "",
        "Per round (2 clients, 4 local steps each, 1 core per client):", "",
        "| round | round s | slowest client train s | slowest client eval s | server eval s | Flower share | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in sim["rounds"]:
        lines.append(f"| {x['round']} | {x['round_seconds']:.1f} | {x['slowest_client_train_seconds']:.1f} | "
                     f"{x['slowest_client_eval_seconds']:.1f} | {x['server_eval_seconds']:.1f} | "
                     f"{_pct(x['flower_share'])} | {x['accuracy']:.3f} |")
    return lines + [""]


def render_privacy_overhead(r: dict) -> list[str]:
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


RENDERERS = {"foundation.json": render_foundation, "privacy_overhead.json": render_privacy_overhead}

HEADER = """# Benchmarks

Measured with `make bench` on this project's machine kind (2 CPU cores, no GPU).
Every table comes from one run, its figures measured side by side in the same
process or minutes apart; the machines are shared, so read ratios, not seconds.
Goals are stated as the issues give them, and whether each was met.
"""


def render() -> None:
    parts = [HEADER]
    for name, renderer in RENDERERS.items():
        path = RESULTS / name
        if path.exists():
            parts += renderer(json.loads(path.read_text()))
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if not args.render:
        for module in BENCHMARKS:
            print(f"== {module}", flush=True)
            subprocess.run([sys.executable, "-m", module], cwd=ROOT, check=True)
    render()
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
