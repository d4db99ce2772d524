# The coordinator: SuperLink plus the ServerApp runtime (fedcl, torch CPU, transformers).
#
# Build context: this folder, on top of the shared environment image (env.Dockerfile:
# the base from Debian packages plus the wheelhouse installed offline); only fedcl's
# own wheel (docker/.fedcl) goes in here. docker/build.sh builds all of them.
# Not flwr/superlink: the SuperLink runs the ServerApp in a subprocess, so the
# image needs fedcl and torch anyway, and one environment for both keeps
# `--disable-runtime-dependency-installation` honest.
ARG ENV=fedcl-env:latest
FROM ${ENV}
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/flwr-home HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUN useradd --uid 10001 --create-home fedcl \
    && mkdir -p /flwr-home /state /runs && chown fedcl /flwr-home /state /runs
COPY .fedcl /tmp/fedcl
RUN /opt/venv/bin/pip install --quiet --no-cache-dir --no-index --no-deps /tmp/fedcl/*.whl \
    && rm -rf /tmp/fedcl \
    && /opt/venv/bin/python -c "import fedcl.server.app, fedcl.client.app, fedcl.ops.cli"
USER fedcl
WORKDIR /home/fedcl
EXPOSE 9092 9093
# compose runs the same: flower-superlink on loopback behind the Fleet gateway (9093)
# and the operators' control proxy (9092); see README "Deployment".
ENTRYPOINT ["fedcl", "deploy", "coordinator"]
