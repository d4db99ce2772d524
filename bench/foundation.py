"""Foundation benchmark: traffic, training throughput against this machine's peak,
and Flower's share of a round, measured side by side in one run.

    .venv/bin/python -m bench.foundation [--quick]

Writes bench/results/foundation.json. Ratios matter, not absolute seconds:
the machines are shared and noisy, so every figure is measured in the same
process, minutes apart, on the same model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedcl.config import load_config
from fedcl.session import LocalSession
from fedcl.train import autocast, sample_batches

RESULTS = Path(__file__).parent / "results"


def matmul_peak(dtype: torch.dtype, threads: int, size: int = 1024, seconds: float = 3.0) -> float:
    """GFLOP/s of a square matmul at `threads` threads, the machine's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def step_flops(session: LocalSession, batch) -> int:
    """Floating-point operations of one training step (forward + backward), counted by torch."""
    model, task = session.model, session.shared.task
    with FlopCounterMode(display=False) as counter:
        with autocast(session.config.model):
            loss = task.per_example_loss(model, batch).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def training_throughput(overrides: list[str], steps: int, threads: int) -> dict:
    """Tokens/s and achieved GFLOP/s of local LoRA training, beside the matmul peak."""
    config = load_config(None, overrides + [f"model.threads={threads}"])
    session = LocalSession(config, 0, config.federation.clients)
    torch.set_num_threads(threads)
    batches = [session.shared.task.encode(b) for b in sample_batches(
        session.train_records, config.train.batch_size, steps + 1, seed=0)]
    flops = step_flops(session, batches[0])
    params = [p for p in session.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    tokens, start = 0, None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step warms caches and allocators
            start = time.perf_counter()
        with autocast(config.model):
            loss = session.shared.task.per_example_loss(session.model, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 1:
            tokens += int(batch.attention_mask.sum())
    seconds = time.perf_counter() - start
    achieved = flops * steps / seconds / 1e9
    return {"compute_dtype": config.model.compute_dtype, "threads": threads, "steps": steps,
            "batch_size": config.train.batch_size, "max_length": config.model.max_length,
            "seconds_per_step": seconds / steps, "tokens_per_second": tokens / seconds,
            "gflop_per_step": flops / 1e9, "achieved_gflops": achieved}


def simulated_rounds(overrides: list[str]) -> dict:
    """A real `fedcl simulate` run: bytes per client and Flower's share of each round."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [str(Path(sys.executable).with_name("fedcl")), "simulate", "--out", str(out)]
        for item in overrides:
            cmd += ["--set", item]
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first_round = None
        while proc.poll() is None:
            if first_round is None and (out / "checkpoint.json").exists():
                first_round = time.time() - start
            time.sleep(0.2)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation failed:\n{proc.stderr.read()[-3000:]}")
        total = time.time() - start
        metrics = json.loads((out / "metrics.json").read_text())
    rounds = []
    for r in metrics["rounds"]:
        slowest_train = max(c.get("train_seconds", 0.0) for c in r["clients"])
        work = slowest_train + r.get("client_eval_seconds_max", 0.0) + r.get("server_eval_seconds", 0.0)
        rounds.append({"round": r["round"], "round_seconds": r["round_seconds"],
                       "slowest_client_train_seconds": slowest_train,
                       "slowest_client_eval_seconds": r.get("client_eval_seconds_max", 0.0),
                       "server_eval_seconds": r.get("server_eval_seconds", 0.0),
                       "flower_share": max(0.0, r["round_seconds"] - work) / r["round_seconds"],
                       "bytes_up_per_client": r["bytes_up"] / len(r["clients"]),
                       "bytes_down_per_client": r["bytes_down"] / len(r["clients"]),
                       "accuracy": r["eval"].get("accuracy")})
    steady = rounds[1:] or rounds
    return {"base_bytes": metrics["model"]["base_bytes"], "adapter_bytes": metrics["model"]["adapter_bytes"],
            "time_to_first_round_seconds": first_round, "total_seconds": total, "rounds": rounds,
            "steady_flower_share": sum(r["flower_share"] for r in steady) / len(steady),
            "max_bytes_per_client_over_base": max(
                max(r["bytes_up_per_client"], r["bytes_down_per_client"]) for r in rounds)
            / metrics["model"]["base_bytes"]}


RESULT = "foundation.json"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render(r: dict) -> list[str]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, for checking the script")
    args = parser.parse_args()
    model = ["model.name=tiny-llama"] if args.quick else []
    results = {"model": "tiny-llama" if args.quick else "smollm2-135m", "when": time.strftime("%Y-%m-%d %H:%M")}
    print("matmul peak ...", flush=True)
    results["peak_gflops"] = {"float32_2_threads": matmul_peak(torch.float32, 2),
                              "bfloat16_2_threads": matmul_peak(torch.bfloat16, 2, size=512, seconds=2.0)}
    print("training throughput ...", flush=True)
    results["training"] = [training_throughput(model, steps=2 if args.quick else 5, threads=2),
                           training_throughput(model + ["model.compute_dtype=bfloat16"], steps=1, threads=2)]
    for entry in results["training"]:
        key = "float32_2_threads" if entry["compute_dtype"] == "float32" else "bfloat16_2_threads"
        entry["fraction_of_peak"] = entry["achieved_gflops"] / results["peak_gflops"][key]
        entry["fraction_of_float32_peak"] = entry["achieved_gflops"] / results["peak_gflops"]["float32_2_threads"]
    print("simulated rounds ...", flush=True)
    results["simulation"] = simulated_rounds(model + [
        "federation.clients=2", "federation.rounds=3", "train.local_steps=4"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "foundation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
