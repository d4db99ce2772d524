#!/usr/bin/env bash
# The base image of fedcl's containers, built from Debian packages: a minimal
# bookworm root file system (mmdebstrap) with Python 3.11, loaded with
# `docker import`. No image registry is needed, only a Debian mirror.
#
#   docker/base-image.sh [NAME]      # default fedcl-base:bookworm; skips if it exists
#
# Environment: FEDCL_DEBIAN_MIRROR (default: mmdebstrap's, deb.debian.org),
# FEDCL_REBUILD_BASE=1 rebuilds even if the image exists.
set -euo pipefail

NAME=${1:-fedcl-base:bookworm}
if [[ ${FEDCL_REBUILD_BASE:-0} != 1 ]] && docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME exists (FEDCL_REBUILD_BASE=1 to rebuild)"
    exit 0
fi
command -v mmdebstrap >/dev/null || {
    echo "mmdebstrap is missing: apt-get install -y mmdebstrap (as root)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# minbase: apt, dpkg and essential packages only; python3-venv for the image's own venv,
# ca-certificates so that tools inside can verify TLS against Debian's stock CAs.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$work/rootfs.tar" ${FEDCL_DEBIAN_MIRROR:-}
# The imported image has no config of its own: give it a PATH and a shell.
docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$NAME" >/dev/null
echo "base image $NAME: $(docker run --rm "$NAME" python3 --version)"
