"""Check fedcl's layers with import-linter (`lint-imports`, config in .importlinter).

fedcl's import namespace spans several folders: pyproject's
``[tool.setuptools.package-dir]`` installs server/ as ``fedcl.server`` and so
on. In the checkout, ``fedcl/server`` etc. are symbolic links to those
folders, so that Python and import-linter (which reads a package from its
own folder) see the same tree an installation has, and a bare `lint-imports`
in the repository checks the whole package. This script first checks that the
links and the package-dir mapping name the same folders, and that the contract
listing the plain-PyTorch modules names exactly the kernel's layer, so that
neither pair can drift apart; then it runs `lint-imports`.

    python .ci/check_layers.py [SOURCE]     # SOURCE: a checkout (default: this one)

Exit status: 0 when every contract is kept, 1 when one is broken, 2 on a
malformed configuration.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tomllib
from pathlib import Path


def package_dirs(source: Path) -> dict[str, Path]:
    """Import name -> folder, from pyproject.toml's package-dir."""
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = project["tool"]["setuptools"]["package-dir"]
    return {name: source / folder for name, folder in mapping.items()}


def check_links(source: Path) -> str | None:
    """fedcl/<name> must link to the folder package-dir maps fedcl.<name> onto."""
    for name, folder in package_dirs(source).items():
        if name == "fedcl":
            continue
        link = source.joinpath(*name.split("."))
        if not link.is_symlink() or link.resolve() != folder.resolve():
            return (f"{link}: expected a symbolic link to {folder.relative_to(source)}/ (pyproject maps {name} "
                    f"onto it); make it with: ln -sfn ../{folder.relative_to(source)} {link.relative_to(source)}")
    return None


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
    problem = check_links(source) or check_kernel_lists(config_file)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([str(lint), str(config_file), "--no-cache"], cwd=source, env=env)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
