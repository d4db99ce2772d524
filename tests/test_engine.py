"""One small federation through Flower's real simulation engine (Ray), via the CLI.

The rest of the suite drives the apps in-process; this is the smoke test that
the same apps run on the engine users run, and that `--resume` adds rounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engine

FEDCL = str(Path(sys.executable).with_name("fedcl"))
SMALL = ["--set", "data.max_records=60", "--set", "data.max_test_records=24",
         "--set", "train.batch_size=4", "--local-steps", "2"]


def fedcl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDCL, *args], capture_output=True, text=True, timeout=600)


def test_simulate_then_resume_on_the_real_engine(tmp_path):
    out = tmp_path / "run"
    done = fedcl("simulate", "--model", "tiny-deepseek-v3", "--clients", "2", "--rounds", "2",
                 *SMALL, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["base_bytes"] > 0
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert {"accuracy", "macro_f1", "majority_baseline"} <= set(record["eval"])
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert sorted(c["id"] for c in record["clients"]) == [0, 1]
        assert all(c["num_examples"] > 0 for c in record["clients"])
    # every client process printed its plain per-round line
    assert "client 0 | round 2 | loss" in done.stdout + done.stderr

    from peft import PeftModel

    from fedcl import models
    base, _ = models.load_base("tiny-deepseek-v3")
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "round-2"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

    resumed = fedcl("simulate", "--resume", str(out), "--rounds", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3]
    assert after["rounds"][:2] == metrics["rounds"]  # earlier rounds untouched
    assert "round 1 |" not in resumed.stdout  # only round 3 trained
    assert (out / "adapters" / "round-3" / "adapter_model.safetensors").is_file()
