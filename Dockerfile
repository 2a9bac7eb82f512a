# One image for every service-mode process (api, worker, migrate, flower): the compose file
# picks the process with `command:`, so there is deliberately no ENTRYPOINT.
#
#   docker build -t inferq .                          # GPU workers (vllm, CUDA torch)
#   docker build -t inferq --build-arg INFERQ_EXTRA=cpu .   # vLLM's CPU build (laptops, CI)
FROM python:3.11-slim

ARG INFERQ_EXTRA=gpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERQ_CACHE_DIR=/var/cache/inferq

# Triton (pulled in by the GPU build of vLLM) compiles a small C helper at runtime and
# fails without a C compiler; the CPU build drops Triton, so it needs none.
RUN if [ "$INFERQ_EXTRA" = gpu ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
# Copy only what the package is built from (BuildKit then sends only these, not .venv/.git).
COPY pyproject.toml constraints.txt ./
COPY core/ core/
COPY storage/ storage/
COPY router/ router/
COPY tasks/ tasks/
COPY weights/ weights/
COPY submission/ submission/
COPY maintenance/ maintenance/
COPY quality/ quality/
COPY api/ api/
COPY workers/ workers/
COPY inferq/ inferq/

# Not editable: the source folder is not needed at runtime.
# cpu: as the Makefile's install step: the same pins (constraints.txt was resolved for the CPU
# build, so it cannot pin the GPU one), PyTorch's CPU index for torch==2.13.0+cpu, then remove
# the CUDA torch add-ons pip pulls in, which break `import vllm` beside a CPU torch.
RUN case "$INFERQ_EXTRA" in \
      gpu) pip install ".[gpu]" ;; \
      cpu) pip install --constraint constraints.txt \
             --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" \
           && pip uninstall -y torchvision torchaudio torchcodec triton ;; \
      *) echo "INFERQ_EXTRA must be gpu or cpu, got '$INFERQ_EXTRA'" >&2; exit 1 ;; \
    esac \
    && rm -rf /src/*

# Run unprivileged. The cache folder is created here, owned by that user, so a named volume
# mounted on it starts with the same owner and the model cache is writable.
RUN useradd --create-home --uid 10001 inferq \
    && mkdir -p "$INFERQ_CACHE_DIR" \
    && chown inferq:inferq "$INFERQ_CACHE_DIR"
USER inferq
WORKDIR /home/inferq

EXPOSE 8000
CMD ["inferq", "api", "--host", "0.0.0.0", "--port", "8000"]
