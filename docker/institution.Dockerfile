# An institution: SuperNode plus the ClientApp runtime (fedcl, torch CPU, transformers).
# Same slim Python base as the coordinator (see coordinator.Dockerfile for why not flwr/supernode).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /opt/fedcl
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY fedcl fedcl
COPY server server
COPY client client
COPY strategies strategies
COPY continual continual
COPY federation federation
COPY ops ops
RUN pip install -e . && useradd --uid 10001 --create-home fedcl \
    && mkdir -p /state && chown fedcl /state
USER fedcl
ENTRYPOINT ["flower-supernode"]
