#!/usr/bin/env bash
# Single-node launch: NPROC processes (default: one per GPU, else 2 on CPU), Hydra overrides after.
#   launch/torchrun.sh experiment=demo parallel.tp=2
# Runs where you stand, like bdlora-train: relative paths (run_dir, data.source, --config-dir,
# deepspeed.config_file) and Hydra's default outputs/ resolve against the current directory.
# torchrun and python come from PATH: activate the environment that has bdlora installed.
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m bdlora.train "$@"
