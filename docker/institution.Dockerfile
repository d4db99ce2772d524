# An institution: SuperNode plus the ClientApp runtime (fedcl, torch CPU, transformers).
# The entrypoint is `fedcl deploy node` (ops/deploy/node.py): the node's long-lived worker
# (model kept loaded, socket /state/worker.sock) next to flower-supernode, so that the
# ClientApp process Flower starts per message only forwards it and imports no torch.
# Same environment image as coordinator.Dockerfile (read there why, and how to build);
# the two images share its layers.
ARG ENV=fedcl-env:latest
FROM ${ENV}
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUN useradd --uid 10001 --create-home fedcl && mkdir -p /state && chown fedcl /state
COPY .fedcl /tmp/fedcl
RUN /opt/venv/bin/pip install --quiet --no-cache-dir --no-index --no-deps /tmp/fedcl/*.whl \
    && rm -rf /tmp/fedcl \
    && /opt/venv/bin/python -c "import fedcl.server.app, fedcl.client.app, fedcl.ops.cli, fedcl.ops.deploy.node"
USER fedcl
WORKDIR /home/fedcl
# The container's command is flower-supernode's own flags (compose.yml), with one
# --node-config naming state-dir; `fedcl deploy node` adds worker="<state-dir>/worker.sock".
ENTRYPOINT ["fedcl", "deploy", "node", "--"]
