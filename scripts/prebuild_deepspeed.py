"""Compile DeepSpeed's CPU communication op once, into ``TORCH_EXTENSIONS_DIR``.

DeepSpeed builds ``deepspeed_shm_comm`` the first time it starts on CPU (about a minute); ``make
setup`` runs this with ``TORCH_EXTENSIONS_DIR=.venv/torch_extensions`` so that later runs, the
tests included, load the cached build in a fraction of a second.

    DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=.venv/torch_extensions python scripts/prebuild_deepspeed.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.accelerator import get_accelerator  # noqa: E402  (reads DS_ACCELERATOR on import)


def main() -> None:
    start = time.perf_counter()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    builder.load()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    print(f"deepspeed_shm_comm ready in {where} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
