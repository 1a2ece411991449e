#!/usr/bin/env bash
# Train with DeepSpeed's launcher: ZeRO over the data-parallel group, bdlora's own TP inside.
#   launch/deepspeed.sh parallel.tp=2 deepspeed=zero2 steps=200           # one node, NPROC processes
#   HOSTFILE=hosts launch/deepspeed.sh parallel.tp=8 model=llama3_1_8b   # several nodes (a hostfile)
# Every argument is a Hydra override for bdlora-train. NPROC (default: the GPUs, else 2 on CPU),
# MASTER_PORT (default 29500) and HOSTFILE (DeepSpeed's "host slots=N" lines) come from the
# environment. The launcher adds --local_rank=N, which bdlora-train accepts.
# Runs where you stand, like bdlora-train: relative paths (run_dir, data.source, --config-dir,
# deepspeed.config_file, HOSTFILE) and Hydra's default outputs/ resolve against the current directory
# (with a HOSTFILE, DeepSpeed's pdsh runner starts every node's ranks in this same path). deepspeed
# and python (or PYTHON) come from PATH: activate the environment that has bdlora installed.
set -euo pipefail
PY="${PYTHON:-python}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  NPROC="${NPROC:-2}"
fi
# DeepSpeed's CPU communication op, compiled once into the environment by `make setup`
OPS="$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions"
if [[ -z "${TORCH_EXTENSIONS_DIR:-}" && -d "$OPS" ]]; then
  export TORCH_EXTENSIONS_DIR="$OPS"
fi
ARGS=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
else
  ARGS+=(--num_gpus "$NPROC")
fi
exec deepspeed "${ARGS[@]}" --module bdlora.train parallel.engine=deepspeed "$@"
