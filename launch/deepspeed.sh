#!/usr/bin/env bash
# Train with DeepSpeed's launcher: ZeRO over the data-parallel group, bdlora's own TP inside.
#   launch/deepspeed.sh parallel.tp=2 deepspeed=zero2 steps=200           # one node, NPROC processes
#   HOSTFILE=hosts launch/deepspeed.sh parallel.tp=8 model=llama3_1_8b   # several nodes (a hostfile)
# Every argument is a Hydra override for bdlora-train. NPROC (default: the GPUs, else 2 on CPU),
# MASTER_PORT (default 29500) and HOSTFILE (DeepSpeed's "host slots=N" lines) come from the
# environment. The launcher adds --local_rank=N, which bdlora-train accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  NPROC="${NPROC:-2}"
fi
if [[ -z "${TORCH_EXTENSIONS_DIR:-}" && -d .venv/torch_extensions ]]; then
  export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"  # make setup compiled DeepSpeed's CPU op here
fi
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
else
  ARGS+=(--num_gpus "$NPROC")
fi
exec deepspeed "${ARGS[@]}" --module bdlora.train parallel.engine=deepspeed "$@"
