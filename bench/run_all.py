"""`make bench`: run every benchmark, then write BENCHMARKS.md from the results.

    .venv/bin/python -m bench.run_all            # run, then render
    .venv/bin/python -m bench.run_all --render   # only render existing results
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Each module writes bench/results/<RESULT> when run and has render(result) -> markdown lines.
BENCHMARKS = ["bench.foundation", "bench.privacy_overhead", "bench.frozen", "bench.deployment", "bench.tuning",
              "bench.strategies", "bench.continual", "bench.privacy_utility"]


HEADER = """# Benchmarks

Measured with `make bench` on this project's machine kind (2 CPU cores, no GPU).
Every table comes from one run, its figures measured side by side in the same
process or minutes apart; the machines are shared, so read ratios, not seconds.
Goals are stated as the issues give them, and whether each was met.
"""


def render() -> None:
    parts = [HEADER]
    for name in BENCHMARKS:
        module = importlib.import_module(name)  # each benchmark renders its own section
        for result in [module.RESULT, *getattr(module, "EXTRA_RESULTS", [])]:
            path = RESULTS / result
            if path.exists():
                parts += module.render(json.loads(path.read_text()))
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
