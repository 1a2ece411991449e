"""Step time of the DeepSpeed engine against the native one, on the same training run.

Both engines train the same model on the same data through the real CLI (``torchrun``), at the
same layout; the runs alternate (native, DeepSpeed, native, DeepSpeed, ...) so machine load falls
on both. Each run's step times come from its ``metrics.jsonl`` (the first steps, which include
warm-up, left out); the script prints the median per engine and their ratio.

    python scripts/bench_engines.py                      # DP 2, ZeRO 1, tiny Llama; ~3 min on 2 cores
    python scripts/bench_engines.py --nproc 4 --tp 2 --stage 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_times(args: argparse.Namespace, engine: str, run_dir: Path) -> list[float]:
    overrides = [
        "experiment=demo",
        f"steps={args.steps}",
        "eval_every=0",
        "checkpoint.every=0",
        "logger.progress=false",
        f"parallel.tp={args.tp}",
        f"parallel.engine={engine}",
        f"deepspeed=zero{args.stage}",
        f"run_dir={run_dir}",
    ]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    subprocess.run([*launcher, "-m", "bdlora.train", *overrides], env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if "step_time" in r and r["step"] > args.skip]


def main() -> None:
    args = parse_args()
    times: dict[str, list[float]] = {"native": [], "deepspeed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for engine in times:
                times[engine] += step_times(args, engine, Path(tmp) / f"{engine}-{repeat}")
    dp = args.nproc // args.tp
    print(f"$ python scripts/bench_engines.py --nproc {args.nproc} --tp {args.tp} --stage {args.stage}")
    print(
        f"tiny Llama (experiment=demo), dp={dp} x tp={args.tp}, ZeRO {args.stage}, {args.steps} steps x "
        f"{args.repeats} runs per engine, first {args.skip} steps of each left out"
    )
    for engine, values in times.items():
        print(f"{engine:10s} median step {statistics.median(values) * 1e3:8.2f} ms  ({len(values)} steps)")
    ratio = statistics.median(times["deepspeed"]) / statistics.median(times["native"])
    print(f"step time deepspeed / native: {ratio:.3f}")


if __name__ == "__main__":
    main()
