"""Check fedcl's layers with import-linter, on the package as it installs.

import-linter reads a package from one folder, but fedcl's import namespace
spans several (pyproject's ``[tool.setuptools.package-dir]`` maps
``fedcl.server`` onto server/, and so on). This lays the source tree out as
an installation would, in a temporary folder (the .py files only, from the
mapping in pyproject.toml), and runs ``lint-imports`` there with the
repository's ``.importlinter``. It also checks that the contract naming the
plain-PyTorch modules lists exactly the kernel's modules of the layers
contract, so that the two lists cannot drift apart.

    python .ci/check_layers.py [SOURCE]     # SOURCE: a checkout (default: this one)

Exit status: 0 when every contract is kept, 1 when one is broken, 2 on a
malformed configuration.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path


def package_dirs(source: Path) -> dict[str, Path]:
    """Import name -> folder, from pyproject.toml's package-dir."""
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = project["tool"]["setuptools"]["package-dir"]
    return {name: source / folder for name, folder in mapping.items()}


def lay_out(source: Path, target: Path) -> None:
    """Copy every package's .py files to where an installation puts them."""
    for name, folder in package_dirs(source).items():
        dest = target.joinpath(*name.split("."))
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder)
            if "__pycache__" in relative.parts:
                continue
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / relative)


def check_kernel_lists(config_file: Path) -> str | None:
    """The forbidden contract's kernel modules must be the layers contract's last layer."""
    parser = configparser.ConfigParser()
    parser.read(config_file, encoding="utf-8")
    layers = [line.strip() for line in parser["importlinter:contract:layers"]["layers"].splitlines() if line.strip()]
    kernel = {f"fedcl.{name.strip()}" for name in layers[-1].split(":")}
    sources = {line.strip() for line in parser["importlinter:contract:plain-pytorch"]["source_modules"].splitlines()
               if line.strip()} - {"fedcl.continual"}
    if kernel != sources:
        return (f"{config_file}: the plain-pytorch contract's source_modules differ from the kernel layer "
                f"(only in the layers: {sorted(kernel - sources)}; only in source_modules: {sorted(sources - kernel)})")
    return None


def main(argv: list[str]) -> int:
    source = Path(argv[0] if argv else Path(__file__).resolve().parent.parent).resolve()
    config_file = source / ".importlinter"
    problem = check_kernel_lists(config_file)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    lint = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="fedcl-layers-") as tmp:
        lay_out(source, Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        done = subprocess.run([str(lint), str(config_file), "--no-cache"], cwd=tmp, env=env)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
