"""What the vLLM serving tests share: the serving venv, a tiny Llama that vLLM's CPU kernels take,
adapters trained by ``bdlora-train``, and bdlora's and PEFT's greedy tokens to compare with.

vLLM pins an older transformers than the trainer, so it runs in ``.venv-serve`` (``make
setup-serve``); these helpers run in the trainer's environment and start that venv's python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SERVE_PYTHON = Path(os.environ.get("BDLORA_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
ENGINE_SCRIPT = ROOT / "tests" / "vllm_engine.py"
PROMPTS = ("The quick brown fox", "Once upon a time", "import torch\n", "1, 2, 3,")
MAX_TOKENS = 8


def require_serve_venv() -> Path:
    """The serving venv's python; ``make test`` sets BDLORA_REQUIRE_SERVE so a missing one fails."""
    if SERVE_PYTHON.is_file():
        return SERVE_PYTHON
    message = f"no serving venv at {SERVE_PYTHON}: run `make setup-serve`"
    if os.environ.get("BDLORA_REQUIRE_SERVE"):
        pytest.fail(message)
    pytest.skip(message)


def serve_env() -> dict:
    """vLLM on a few CPU cores: one thread per worker, or TP hangs."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def write_tiny_llama(out: Path) -> Path:
    """A 2-layer Llama (4 heads, 4 KV heads of dim 32: TP 1, 2 and 4) with a byte-level tokenizer."""
    from bdlora.presets import save_byte_llama

    return save_byte_llama(
        out, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=4, max_positions=256
    )


def train(run_dir: Path, *overrides: str) -> Path:
    """A short ``bdlora-train`` run (one process) on the embedded data; returns the run directory."""
    command = [
        str(Path(sys.executable).with_name("bdlora-train")),
        "eval_every=0",
        "data.num_examples=200",
        "data.seq_len=32",
        "logger.progress=false",
        f"run_dir={run_dir}",
        *overrides,
    ]
    subprocess.run(command, check=True, capture_output=True, cwd=run_dir.parent)
    return run_dir


def run_engine(spec: dict, workdir: Path, timeout: float = 600) -> dict:
    """One vLLM engine (``tests/vllm_engine.py``) at ``spec['tp']``; its JSON result."""
    python = require_serve_venv()
    spec_path, out_path = workdir / f"spec_tp{spec['tp']}.json", workdir / f"result_tp{spec['tp']}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [str(python), str(ENGINE_SCRIPT), str(spec_path), str(out_path)],
        check=False,
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not out_path.is_file():
        raise AssertionError(
            f"vLLM engine at TP {spec['tp']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(out_path.read_text())


@torch.no_grad()
def greedy_with_logprobs(model, prompt_ids: list[int], eos_token_id: int) -> dict:
    """bdlora's own greedy decoding (what ``bdlora generate`` runs), then each token's logprob."""
    from bdlora.train.export import greedy_decode

    tokens = greedy_decode(model, prompt_ids, MAX_TOKENS, eos_token_id)
    ids = torch.tensor([prompt_ids + tokens])  # (1, T)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    start = len(prompt_ids) - 1
    return {"tokens": tokens, "logprobs": [float(logprobs[start + i, t]) for i, t in enumerate(tokens)]}
