# The coordinator: SuperLink plus the ServerApp runtime (fedcl, torch CPU, transformers).
# Base: a slim Python image, not flwr/superlink: the SuperLink here runs the ServerApp
# in a subprocess (isolation "subprocess"), so the image needs fedcl and torch anyway,
# and one Python environment for both keeps `--disable-runtime-dependency-installation` honest.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/flwr-home HF_HUB_OFFLINE=1
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
    && mkdir -p /flwr-home /state /runs && chown fedcl /flwr-home /state /runs
USER fedcl
EXPOSE 9093
ENTRYPOINT ["flower-superlink"]
