#!/usr/bin/env bash
# The containers end to end (`make docker-e2e`, as root): a Docker engine (installed
# from Debian's docker.io and started if absent), the images built here with no
# registry (docker/build.sh), then docker/e2e.py: docker/compose.yml up on host
# networking, a run of the tiny model, one institution killed mid-round and started
# again, the run's metrics and the nodes' privacy ledgers checked, no build secret in
# the images, and every container, volume and network of the project removed.
#
#   docker/e2e.sh [--rounds N] [--kill hospital-b] ...   # arguments go to docker/e2e.py
#   FEDCL_DOCKER_BUILD=0 docker/e2e.sh                    # use the images already built
#
# Results: bench/results/docker.json (image sizes, build and run times); logs and the
# run's files (keys removed) in docker/.e2e/<time>/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=$HERE/.e2e/$(date -u +%Y%m%d-%H%M%S)
PROJECT=fedcl-e2e-$$
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

need_root() { [[ $(id -u) == 0 ]] || { echo "docker/e2e.sh: $1 needs root" >&2; exit 2; }; }
apt_install() {
    need_root "installing $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || apt_install docker.io
    need_root "starting dockerd"
    echo "starting dockerd (log: /var/log/fedcl-dockerd.log)"
    nohup dockerd >/var/log/fedcl-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /var/log/fedcl-dockerd.log" >&2; exit 1; }
fi
command -v docker-compose >/dev/null || apt_install docker-compose
command -v mmdebstrap >/dev/null || apt_install mmdebstrap
need_root "chown of the keys to the images' user (uid 10001)"

mkdir -p "$WORK"
# Belt and braces: e2e.py removes the project itself; this covers an interrupted run.
cleanup() {
    docker-compose -p "$PROJECT" -f "$HERE/compose.yml" down --volumes --remove-orphans -t 5 \
        >/dev/null 2>&1 || true
    rm -rf "$WORK/run/keys"
}
trap cleanup EXIT INT TERM

if [[ ${FEDCL_DOCKER_BUILD:-1} == 1 ]]; then
    "$HERE/build.sh" "$WORK/build.json" 2>&1 | grep -v "^WARNING: Location" | tee "$WORK/build.log"
else  # FEDCL_DOCKER_BUILD=0: the images as they are (built before with docker/build.sh)
    for image in coordinator institution; do docker image inspect "fedcl-$image:latest" >/dev/null; done
fi
"$PY" "$HERE/e2e.py" --work "$WORK/run" --timings "$WORK/build.json" --project "$PROJECT" \
    --out "${FEDCL_DOCKER_RESULTS:-$REPO/bench/results/docker.json}" "$@" 2>&1 | tee "$WORK/e2e.log"
