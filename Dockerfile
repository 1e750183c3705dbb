# lorafleet, CPU image: every role (api, trainer, serve with the torch engine, rollout-controller,
# migrate, and `up`, the embedded single process). The GPU image with vLLM is described in
# docs/operations.md ("The GPU image").
#   docker build -t lorafleet:0.1.0 .
#   docker run -p 8000:8000 lorafleet:0.1.0            # the embedded platform (`lorafleet up`)
#   docker run lorafleet:0.1.0 api                      # one role, configured by LORAFLEET_* variables
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first, from the CPU wheel index: the package's own `torch` requirement resolved on its
# own would pull the multi-GB CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/lorafleet
COPY pyproject.toml setup.py README.md ./
COPY platform ./platform
COPY adapters_store ./adapters_store
COPY services ./services
COPY migrations ./migrations
# Editable on purpose: the code finds migrations/ and the ops page's assets beside its own source
# folders (platform/db/migrate.py), which a plain wheel install does not ship.
RUN pip install -e . && lorafleet --help > /dev/null

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lorafleet \
    && mkdir -p /var/lib/lorafleet /var/cache/lorafleet /models \
    && chown lorafleet:lorafleet /var/lib/lorafleet /var/cache/lorafleet /models

USER 10001:10001
ENV HOME=/tmp \
    LORAFLEET_HOST=0.0.0.0 \
    LORAFLEET_PORT=8000 \
    LORAFLEET_DATA_DIR=/var/lib/lorafleet \
    LORAFLEET_CACHE_DIR=/var/cache/lorafleet \
    LORAFLEET_MODEL_DIR=/models
EXPOSE 8000
ENTRYPOINT ["lorafleet"]
CMD ["up"]
