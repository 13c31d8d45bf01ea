# duplex server image: CUDA runtime + PyTorch, model files cached in a volume.
#   docker build -t duplex .
#   docker run --gpus all -p 8998:8998 -v duplex-hf:/data/hf duplex
# Arguments after the image name are passed to `duplex serve` (e.g. --hf-repo kyutai/moshika-pytorch-bf16).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The PyTorch wheel index matching the CUDA runtime above (override both together).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf

# Python from the distribution (3.12 on Ubuntu 24.04) in a virtual environment (PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# An unprivileged user owns the model cache; the volume keeps downloads across containers.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin duplex \
    && mkdir -p /data/hf \
    && chown duplex:duplex /data/hf

WORKDIR /app

# Dependencies first, cached while only the source changes: torch from the CUDA index, the rest from PyPI.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY duplex ./duplex
COPY codec ./codec
COPY model ./model
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir --no-deps .

USER 10001:10001
VOLUME ["/data/hf"]
# 8998: the page, the API and /api/chat; 9100: /metrics when started with --metrics-port 9100 (deploy/k8s).
EXPOSE 8998 9100
# SIGTERM starts the graceful drain (--drain-seconds, default 30): no new calls, /readyz 503, active calls
# go on, then "server restarting"; give the container at least that long to stop (docker stop -t,
# terminationGracePeriodSeconds). /healthz stays 200 while draining: it is the liveness check.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8998/healthz', timeout=4)"]
ENTRYPOINT ["duplex", "serve", "--host", "0.0.0.0", "--port", "8998"]
CMD []
