"""The layers are checked by import-linter (.ci/check_layers.py), and the check can fail.

Each case copies the packages of this checkout to a temporary folder, breaks
one rule there with a single added import, and runs the same check `make
test` runs: it must refuse the copy and name the contract that broke.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check_layers.py"

spec = importlib.util.spec_from_file_location("check_layers", CHECK)
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def copy_checkout(target: Path) -> Path:
    """pyproject.toml, .importlinter and every package folder pyproject maps (fedcl/'s links
    to the other folders kept as links), without caches."""
    target.mkdir()
    for name in ("pyproject.toml", ".importlinter"):
        shutil.copy2(ROOT / name, target / name)
    for folder in {p.relative_to(ROOT) for p in check_layers.package_dirs(ROOT).values()}:
        shutil.copytree(ROOT / folder, target / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target


def run_check(source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(source)], capture_output=True, text=True)


def test_this_checkout_keeps_every_contract():
    done = run_check(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("file, line, contract", [
    # the kernel imports Flower
    ("fedcl/config.py", "import flwr", "The kernel and the continual methods import no Flower"),
    # a continual method imports Ray
    ("continual/replay.py", "import ray", "The kernel and the continual methods import no Flower"),
    # the kernel reaches up into the server app
    ("fedcl/data.py", "from fedcl.server import app", "Layers: ops > client"),
    # the Flower layer reaches up into the operations
    ("strategies/screening.py", "import fedcl.ops.cli", "Layers: ops > client"),
    # the client app and the server app import each other
    ("client/node.py", "import fedcl.server.app", "Layers: ops > client"),
    # a circle of two kernel files
    ("fedcl/records.py", "import fedcl.data", "No circles between the modules"),
])
def test_an_added_import_that_breaks_a_rule_fails_the_check(tmp_path, file, line, contract):
    copy = copy_checkout(tmp_path / "copy")
    path = copy / file
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # added by the test\n", encoding="utf-8")
    done = run_check(copy)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout


def test_a_new_module_outside_every_layer_fails_the_check(tmp_path):
    copy = copy_checkout(tmp_path / "copy")
    (copy / "fedcl" / "newcomer.py").write_text('"""Not placed in a layer."""\n', encoding="utf-8")
    done = run_check(copy)
    assert done.returncode != 0
    assert "newcomer" in done.stdout + done.stderr


def test_kernel_lists_that_drift_apart_are_refused(tmp_path):
    copy = copy_checkout(tmp_path / "copy")
    config = copy / ".importlinter"
    text = config.read_text(encoding="utf-8").replace("    fedcl.optim\n", "", 1)
    config.write_text(text, encoding="utf-8")
    done = run_check(copy)
    assert done.returncode == 2
    assert "fedcl.optim" in done.stderr


def test_the_folder_links_must_match_the_package_mapping(tmp_path):
    copy = copy_checkout(tmp_path / "copy")
    (copy / "fedcl" / "server").unlink()
    (copy / "fedcl" / "server").symlink_to("../client")
    done = run_check(copy)
    assert done.returncode == 2
    assert "fedcl/server" in done.stderr and "ln -sfn ../server" in done.stderr


def test_a_bare_lint_imports_in_the_checkout_checks_the_whole_package():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout
