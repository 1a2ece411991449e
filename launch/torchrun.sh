#!/usr/bin/env bash
# Single-node launch: NPROC processes (default: one per GPU, else 2 on CPU), Hydra overrides after.
#   launch/torchrun.sh experiment=demo parallel.tp=2
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m bdlora.train "$@"
