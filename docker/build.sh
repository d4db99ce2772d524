#!/usr/bin/env bash
# Build fedcl's images with no image registry: the base from Debian packages, a
# wheelhouse resolved with this machine's pip configuration (outside any image),
# then the coordinator and institution images from docker/*.Dockerfile.
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
# The deps stage tagged too (fedcl-deps): a tagged stage is never pruned as dangling,
# so the next build finds its cache (the stage is the same in both Dockerfiles).
step deps env DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$BASE" --target deps \
    -f "$HERE/coordinator.Dockerfile" -t "fedcl-deps:$TAG" "$HERE"
for image in coordinator institution; do
    step "$image" env DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$BASE" \
        -f "$HERE/$image.Dockerfile" -t "fedcl-$image:$TAG" "$HERE"
done

if [[ $# -ge 1 ]]; then
    size() { docker image inspect --format '{{.Size}}' "$1"; }
    cat > "$1" <<JSON
{"base_image": "$BASE", "tag": "$TAG",
 "seconds": {"base": ${secs[base]}, "wheelhouse": ${secs[wheelhouse]}, "deps": ${secs[deps]},
             "coordinator": ${secs[coordinator]}, "institution": ${secs[institution]}},
 "bytes": {"base": $(size "$BASE"), "coordinator": $(size "fedcl-coordinator:$TAG"),
           "institution": $(size "fedcl-institution:$TAG"),
           "wheelhouse": $(du -sb "$HERE/.wheels" | cut -f1)}}
JSON
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^fedcl-'
