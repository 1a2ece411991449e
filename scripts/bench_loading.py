"""Peak memory of ``bdlora.from_pretrained`` per rank, at TP 1 and TP 2.

The launcher saves a seeded Llama (safetensors, ~270 MB fp32 by default) to a temporary directory,
then starts one torchrun job per TP degree (``python -m torch.distributed.run``, so torchrun need not
be on PATH). Each rank imports everything and builds the model once on the meta device (warm-up), resets
its peak-RSS mark (``echo 5 > /proc/self/clear_refs``), loads the model with a fresh BD-LoRA adapter,
and reports the peak RSS reached during the load (``VmHWM``) minus its RSS just before it. A sampling
thread splits RSS into anonymous memory (what the process allocated) and file-backed pages (the
safetensors mmap), and ``ru_maxrss`` is reported as a cross-check.

    python scripts/bench_loading.py                  # TP 1 and TP 2, ~30 s on 2 cores
    python scripts/bench_loading.py --tp 1 2 4 --layers 8

No rank should ever hold the full model: at TP 2 a rank's peak should be its own parameters (half of
every sharded linear plus the replicated embeddings, norms and lm_head) plus at most one checkpoint
tensor's mmapped pages.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rank_main import run_rank, torchrun
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.utils.logging import disable_progress_bar

from bdlora import BDLoraConfig
from bdlora.parallel import from_pretrained
from bdlora.parallel.mesh import ParallelDims, build_mesh, init_distributed
from bdlora.parallel.sharding import tp_layouts
from bdlora.presets import llama_config

MB = 1e6
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
COLUMNS = ("tp", "rank", "local param MB", "peak RSS delta MB", "full model MB", "ratio")
DETAIL = (
    "tp",
    "rank",
    "RSS after - before MB",
    "sampled peak anon delta MB",
    "sampled peak file-backed delta MB",
    "ru_maxrss delta MB",
)


@dataclass(frozen=True)
class BenchArgs:
    tp: list[int]
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    rank: int
    seed: int
    model_dir: str | None
    worker_result: str | None


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP degrees, one launch each")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16, help="also the KV heads; must be divisible by tp")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rank", type=int, default=16, help="rank of the fresh BD-LoRA adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-dir", default=None, help="load this saved model instead of saving one (sizes ignored)"
    )
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)  # set by the launcher
    return BenchArgs(**vars(p.parse_args(argv)))


# -- launcher ------------------------------------------------------------------------------------
def save_model(args: BenchArgs, model_dir: Path) -> None:
    config = llama_config(args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    torch.manual_seed(args.seed)
    disable_progress_bar()
    LlamaForCausalLM(config).save_pretrained(model_dir)  # safetensors


def launch(args: BenchArgs, model_dir: Path, tp: int, result: Path) -> list[dict]:
    """One torchrun job of ``tp`` ranks; returns each rank's measurements."""
    cmd = [
        *torchrun(tp, __file__),
        f"--model-dir={model_dir}",
        f"--rank={args.rank}",
        f"--worker-result={result}",
    ]
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun would set it anyway, with a warning
    subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def print_tables(results: list[dict]) -> None:
    print(row(COLUMNS))
    print("|" + "---|" * len(COLUMNS))
    for r in results:
        peak = r["peak_delta"]
        print(
            row(
                (
                    r["tp"],
                    r["rank"],
                    f"{r['local_param_bytes'] / MB:.1f}",
                    f"{peak / MB:.1f}",
                    f"{r['full_bytes'] / MB:.1f}",
                    f"{peak / r['full_bytes']:.2f}",
                )
            )
        )
    print("ratio = peak RSS delta / full model; peak RSS delta = VmHWM after the load - VmRSS before it")
    print()
    print(row(DETAIL))
    print("|" + "---|" * len(DETAIL))
    for r in results:
        cells = (r["rss_after"] - r["rss_before"], r["anon_peak_delta"], r["file_peak_delta"], r["ru_delta"])
        print(row((r["tp"], r["rank"], *(f"{c / MB:.1f}" for c in cells))))
    sharded = [r for r in results if r["tp"] > 1]
    worst = max((r["peak_delta"] / r["full_bytes"] for r in sharded), default=None)
    if worst is not None:
        verdict = "no rank reached" if worst < 1 else "SOME RANK REACHED"
        print(f"at TP > 1, {verdict} the full model size during the load (worst ratio {worst:.2f})")
    local = {r["tp"]: r for r in results if r["rank"] == 0}
    for tp, r in sorted(local.items()):
        print(
            f"tp {tp} rank 0: base params {r['base_param_bytes'] / MB:.1f} MB (replicated "
            f"{r['replicated_bytes'] / MB:.1f} MB), adapter {r['adapter_param_bytes'] / MB:.2f} MB"
        )


def run_launcher(args: BenchArgs) -> None:
    print("$ python " + shlex.join(sys.argv), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / "model")
        if args.model_dir is None:
            start = time.perf_counter()
            save_model(args, model_dir)
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            print(
                f"saved {model_dir} ({', '.join(files)}) in {time.perf_counter() - start:.1f} s", flush=True
            )
        results = []
        for tp in args.tp:
            results += launch(args, model_dir, tp, Path(tmp) / f"tp{tp}.json")
    print_tables(results)


# -- one rank ------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """Bytes of the ``STATUS_KEYS`` lines of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = proc_status()
    return status["VmHWM"] <= status["VmRSS"] + 1024 * 1024  # within 1 MiB: it did reset


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class RssSampler:
    """Polls /proc/self/status in a thread: the highest anonymous and file-backed RSS seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            status = proc_status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], status[key])
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of every tensor in the checkpoint, from the safetensors headers (no tensor is read)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(
            end - begin
            for k, v in header.items()
            if k != "__metadata__"
            for begin, end in [v["data_offsets"]]
        )
    return total


def warm_up(model_dir: Path) -> None:
    """Build the model once on the meta device (lazy imports, config parsing) before measuring."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)


def param_bytes(model: nn.Module) -> dict[str, int]:
    sharded = {f"{name}.base_layer.weight" for name in tp_layouts(model)}
    out = {"base_param_bytes": 0, "adapter_param_bytes": 0, "replicated_bytes": 0}
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        out["adapter_param_bytes" if ".lora_" in name else "base_param_bytes"] += size
        if ".lora_" not in name and name not in sharded:
            out["replicated_bytes"] += size
    out["local_param_bytes"] = out["base_param_bytes"] + out["adapter_param_bytes"]
    return out


def measure_load(model_dir: Path, rank: int, mesh: DeviceMesh) -> dict:
    """Peak RSS of one ``from_pretrained`` on this rank, against its RSS just before."""
    gc.collect()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM via /proc/self/clear_refs; the peak would be meaningless")
    before, ru_before = proc_status(), ru_maxrss()
    with RssSampler() as sampler:
        model = from_pretrained(
            model_dir, BDLoraConfig(rank=rank, alpha=2 * rank, nblocks=mesh["tp"].size()), mesh=mesh
        )
    after, ru_after = proc_status(), ru_maxrss()
    return {
        "rss_before": before["VmRSS"],
        "rss_after": after["VmRSS"],
        "peak_delta": after["VmHWM"] - before["VmRSS"],
        "anon_peak_delta": max(sampler.peak["RssAnon"], after["RssAnon"]) - before["RssAnon"],
        "file_peak_delta": max(sampler.peak["RssFile"], after["RssFile"]) - before["RssFile"],
        "ru_delta": ru_after - ru_before,
        **param_bytes(model),
    }


def run_worker(args: BenchArgs) -> None:
    world = init_distributed()
    torch.set_num_threads(1)
    mesh = build_mesh(ParallelDims(world, tp=world))
    model_dir = Path(args.model_dir)
    full = checkpoint_bytes(model_dir)
    warm_up(model_dir)
    dist.barrier()
    result = {
        "tp": world,
        "rank": dist.get_rank(),
        "full_bytes": full,
        **measure_load(model_dir, args.rank, mesh),
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(args.worker_result).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        run_launcher(args)
        return
    run_rank(run_worker, args)


if __name__ == "__main__":
    main()
