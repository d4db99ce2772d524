#!/usr/bin/env bash
# Build fedcl's images with no image registry: the base from Debian packages, a
# wheelhouse resolved with this machine's pip configuration (outside any image), the
# shared environment image (env.Dockerfile), then the coordinator and institution
# images with fedcl's own wheel on top. Each slow step runs only when its inputs
# changed: the base when absent, the dependencies' wheels when pyproject's list (or
# the torch or asset pins) changed, the environment when the wheelhouse or the base
# did (its label records which); fedcl's wheel and the two top images every time.
#
#   docker/build.sh [TIMINGS_JSON]     # tags fedcl-coordinator:latest, fedcl-institution:latest
#
# TIMINGS_JSON (optional) receives each step's seconds and each image's size.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TAG=${FEDCL_IMAGE_TAG:-latest}
BASE=${FEDCL_BASE_IMAGE:-fedcl-base:bookworm}
declare -A secs

step() {  # step NAME COMMAND...: run it, remember how long it took
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name"
    "$@"
    secs[$name]=$((SECONDS - t0))
}

step base "$HERE/base-image.sh" "$BASE"
step wheelhouse "$HERE/wheelhouse.sh" "$BASE"
# The classic builder: it needs no buildx plugin, and the build needs no secret
# (it installs from the wheelhouse with --no-index), so BuildKit's secret mounts are moot.
build_env() {
    local want have
    want="wheels $(cat "$HERE/.wheels/.resolved-for") base $(docker image inspect --format '{{.Id}}' "$BASE")"
    have=$(docker image inspect --format '{{index .Config.Labels "fedcl.env"}}' "fedcl-env:$TAG" 2>/dev/null || true)
    if [[ $have == "$want" ]]; then
        echo "fedcl-env:$TAG is up to date ($want)"
        return
    fi
    DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$BASE" --label "fedcl.env=$want" \
        -f "$HERE/env.Dockerfile" -t "fedcl-env:$TAG" "$HERE"
}
step env build_env
for image in coordinator institution; do
    step "$image" env DOCKER_BUILDKIT=0 docker build --quiet --build-arg "ENV=fedcl-env:$TAG" \
        -f "$HERE/$image.Dockerfile" -t "fedcl-$image:$TAG" "$HERE"
done

if [[ $# -ge 1 ]]; then
    size() { docker image inspect --format '{{.Size}}' "$1"; }
    cat > "$1" <<JSON
{"base_image": "$BASE", "tag": "$TAG",
 "seconds": {"base": ${secs[base]}, "wheelhouse": ${secs[wheelhouse]}, "env": ${secs[env]},
             "coordinator": ${secs[coordinator]}, "institution": ${secs[institution]}},
 "bytes": {"base": $(size "$BASE"), "coordinator": $(size "fedcl-coordinator:$TAG"),
           "institution": $(size "fedcl-institution:$TAG"),
           "wheelhouse": $(du -sb "$HERE/.wheels" | cut -f1)}}
JSON
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^fedcl-'
