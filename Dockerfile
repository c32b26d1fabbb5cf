# Two targets on one dependency layer order:
#   docker build --target api    -t distill-api .     slim Python, no torch/CUDA
#   docker build --target worker -t distill-worker .  torch 2.13.0 CUDA build + diffusers
# Dependencies are installed from pyproject.toml before the source is copied, so code changes
# rebuild only the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    DISTILL_DATA_DIR=/data \
    DISTILL_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 distill \
 && mkdir -p /app /data \
 && chown distill:distill /data
WORKDIR /app
COPY pyproject.toml ./
# Requirement lists straight from pyproject.toml: one source of truth for versions.
# One line, no RUN heredoc: builders without BuildKit (podman/buildah, classic docker) take it.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('/tmp/requirements-api.txt', 'w').write(chr(10).join(p['dependencies']) + chr(10)); \
open('/tmp/requirements-worker.txt', 'w').write( \
    chr(10).join(p['optional-dependencies']['worker']) + chr(10))"
# Layer 1 (both targets): what the API needs.
RUN pip install -r /tmp/requirements-api.txt

FROM base AS api
# The API runs core/ and service/ (the webhook sender too: compose runs it from this image);
# no model code is in it.
COPY core ./core
COPY service ./service
USER distill
EXPOSE 8000
CMD ["python", "-m", "service"]

FROM base AS worker
# Layer 2 (worker only): torch 2.13.0 from PyPI is the CUDA build for Linux x86_64 and carries
# its CUDA runtime libraries; the host needs only the NVIDIA driver and container toolkit.
# A different wheel index (e.g. another CUDA line) can be chosen at build time.
ARG TORCH_INDEX_URL=""
# Or a directory of wheels mounted into the build (`podman build -v /opt/wheels:/wheels:ro
# --build-arg WHEELS=/wheels`), e.g. a CPU torch wheel for a build without a GPU in mind.
ARG WHEELS=""
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${WHEELS:+--find-links "$WHEELS"} -r /tmp/requirements-worker.txt
# SDXL-Turbo's weights (about 7 GB) land here once; mount a volume to keep them.
ENV HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/huggingface/torchinductor
RUN mkdir -p /cache/huggingface && chown -R distill:distill /cache
COPY core ./core
COPY worker ./worker
USER distill
# SIGTERM: finish the current batch, put the job back at the front of the queue, exit.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker"]
