"""Serving speed under vLLM: the base model, vLLM's default LoRA, S-LoRA and BD-LoRA, side by side.

Decode throughput (generated tokens / wall time of one ``LLM.generate`` call) and time per output
token (TPOT, from vLLM's per-request metrics) at each TP degree, for four modes:

- ``base``: the base model, in an engine without LoRA;
- ``lora``: vLLM's default LoRA (dense adapters saved as ``peft-lora``; A of a column layer and B
  of a row layer whole on every rank), stock vLLM (bdlora's plugin left out, ``VLLM_PLUGINS=``);
- ``slora``: vLLM's ``fully_sharded_loras=True`` (S-LoRA's sharding), the same dense adapters;
- ``bdlora``: BD-LoRA adapters (``peft-bdlora``) through bdlora's plugin: each rank holds its
  blocks, buffers of rank ``max_lora_rank / TP``, no collective added;

with 1, 4 and 16 distinct adapters in a batch of 16 requests (adapters assigned round-robin), at
matched adapter parameter counts: the BD-LoRA rank is the multiple of nblocks whose parameter
count is nearest the dense adapter's. Every LoRA engine also times the same batch without LoRA
requests (``adapters 0``): the engine's always-on LoRA cost, and a check that it serves the base
model's tokens.

The script builds its own Llama and adapters (trainer venv: transformers, bdlora), then starts one
engine per (TP, mode) in the serving venv (``--serve-python``), each running this file with
``--worker``; the worker imports vLLM only. At each TP degree the four engines are started one
after the other and then live side by side: each round runs every (mode, adapters) configuration
once, the order of the modes and of the adapter counts rotating from round to round, so a change
in the machine's load falls on all of them alike (``--one-engine-at-a-time`` for models too big for
that). When the timing moves to another engine it first waits ``--settle`` seconds: vLLM's idle
workers spin for a second after their last call, which on a few cores slows the next engine.

    python scripts/bench_serve.py                 # TP 2 and 4, hidden 512, 4 layers; ~10 min on 2 cores
    python scripts/bench_serve.py --quick         # smoke test: TP 2, 1 layer, batch 8, 1 and 4 adapters
    python scripts/bench_serve.py --tp 1 2 4 8 --hidden 4096 --intermediate 14336 --layers 8 \\
        --heads 32 --kv-heads 8 --rank 16 --nblocks 8 --max-tokens 128    # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("base", "lora", "slora", "bdlora")
LORA_MODES = MODES[1:]
LABELS = {"base": "base", "lora": "LoRA (vLLM default)", "slora": "S-LoRA", "bdlora": "BD-LoRA"}
# vLLM's --max-lora-rank takes one of these values (bdlora.serve.launch.VLLM_LORA_RANKS).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the rest (o, down) are row layers


# -- options ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=None, help="TP degrees (default 2 4)")
    p.add_argument("--adapters", type=int, nargs="+", default=None, help="distinct adapters per batch")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=None, help="default 4 (1 with --quick)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--rank", type=int, default=16, help="rank of the dense adapters (lora, slora)")
    p.add_argument("--bd-rank", type=int, default=None, help="default: the matched parameter count")
    p.add_argument(
        "--nblocks", type=int, default=None, help="BD-LoRA blocks; default a multiple of every TP, >= 4"
    )
    p.add_argument("--batch", type=int, default=16, help="requests per generate call")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens decoded per request (default 16)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--settle",
        type=float,
        default=1.5,
        help="seconds to wait when the timing moves to another engine (vLLM's idle workers spin for 1 s)",
    )
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random adapter factors")
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--eager", choices=("auto", "yes", "no"), default="auto", help="auto: eager on CPU only")
    p.add_argument("--serve-python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    p.add_argument(
        "--workdir", default=None, help="model, adapters and engine logs (default: a temp dir, removed after)"
    )
    p.add_argument("--engine-timeout", type=float, default=900.0, help="seconds per engine start or call")
    p.add_argument(
        "--kv-cache-mib", type=int, default=None, help="KV cache per worker (default: fits the batch)"
    )
    p.add_argument(
        "--one-engine-at-a-time",
        action="store_true",
        help="each mode's engine alone, not interleaved with the others (for models too big for 4 at once)",
    )
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: TP 2, 1 layer, batch 8, 8 tokens, 1 and 4 adapters"
    )
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "tp": [2] if quick else [2, 4],
        "adapters": [1, 4] if quick else [1, 4, 16],
        "layers": 1 if quick else 4,
        "max_tokens": 8 if quick else 16,
        "reps": 3 if quick else 5,
    }
    for name, value in defaults.items():  # explicit options beat --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.batch == 16:
        args.batch = 8
    args.kv_heads = args.kv_heads or args.heads
    if args.nblocks is None:  # the smallest multiple of every TP degree that is at least 4
        lcm = math.lcm(*args.tp)
        args.nblocks = lcm * math.ceil(4 / lcm)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every size must suit every TP degree before anything is built."""
    problems = []
    head_dim = args.hidden // args.heads
    if args.hidden % args.heads or head_dim % 32:
        problems.append(
            f"--hidden / --heads = {args.hidden / args.heads}: vLLM's CPU attention wants 32, 64, ..."
        )
    for tp in args.tp:
        if args.nblocks % tp:
            problems.append(f"--nblocks {args.nblocks} is not a multiple of TP {tp}")
        if args.kv_heads % tp or args.heads % tp:
            problems.append(f"TP {tp} must divide --heads and --kv-heads")
        if "slora" in args.modes and vllm_max_lora_rank(args.rank) % tp:
            problems.append(f"S-LoRA at TP {tp}: max_lora_rank {vllm_max_lora_rank(args.rank)} not divisible")
    widths = {
        "--hidden": args.hidden,
        "--intermediate": args.intermediate,
        "the KV width": args.kv_heads * head_dim,
    }
    problems += [
        f"{k} {v} is not a multiple of --nblocks {args.nblocks}"
        for k, v in widths.items()
        if v % args.nblocks
    ]
    if args.bd_rank is not None and args.bd_rank % args.nblocks:
        problems.append(f"--bd-rank {args.bd_rank} must be a multiple of --nblocks {args.nblocks}")
    if max(args.adapters) > args.batch:
        problems.append(f"--adapters {max(args.adapters)} exceeds --batch {args.batch}")
    if args.max_tokens < 2 or args.reps < 1:
        problems.append("--max-tokens must be >= 2 and --reps >= 1")
    if problems:
        raise SystemExit("bench_serve.py: " + "; ".join(problems))


# -- parameter counts ------------------------------------------------------------------------------------
def module_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adapted projection of one Llama layer."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def dense_params(shapes: dict[str, tuple[int, int]], rank: int, layers: int) -> int:
    """LoRA: r (d_in + d_out) per module."""
    return layers * sum(rank * (d_in + d_out) for d_in, d_out in shapes.values())


def bd_params(shapes: dict[str, tuple[int, int]], rank: int, nblocks: int, layers: int) -> int:
    """BD-LoRA: column r (d_in + d_out / N), row r (d_in / N + d_out) per module."""
    total = 0
    for name, (d_in, d_out) in shapes.items():
        if name in COLUMN:
            total += rank * (d_in + d_out // nblocks)
        else:
            total += rank * (d_in // nblocks + d_out)
    return layers * total


def matched_bd_rank(shapes: dict[str, tuple[int, int]], rank: int, nblocks: int) -> int:
    """The multiple of ``nblocks`` whose BD-LoRA parameter count is nearest the dense one's."""
    dense = dense_params(shapes, rank, 1)
    candidates = range(nblocks, VLLM_LORA_RANKS[-1] + 1, nblocks)
    return min(candidates, key=lambda r: (abs(bd_params(shapes, r, nblocks, 1) - dense), r))


def vllm_max_lora_rank(rank: int) -> int:
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise SystemExit(f"rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


# -- the machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


# -- building the model and the adapters (trainer venv) ----------------------------------------------------
def build_model(args: argparse.Namespace, out: Path) -> Path:
    """A random Llama of the requested sizes, with bdlora's byte tokenizer (vocabulary 256)."""
    from bdlora.presets import save_byte_llama

    if (out / "config.json").is_file():
        return out
    return save_byte_llama(
        out, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, max_model_len(args)
    )


def build_adapters(
    base: Path, out: Path, rank: int, nblocks: int, count: int, std: float, seed: int
) -> tuple[list[str], int]:
    """``count`` adapters of random normal factors (nblocks 1: ``peft-lora``, else ``peft-bdlora``);
    their paths and their trainable parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    import bdlora

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    bdlora.apply_bdlora(model, bdlora.BDLoraConfig(rank=rank, alpha=2.0 * rank, nblocks=nblocks))
    factors = [p for p in model.parameters() if p.requires_grad]
    fmt = "peft-lora" if nblocks == 1 else "peft-bdlora"
    paths = []
    for i in range(count):
        path = out / f"{fmt}_r{rank}_n{nblocks}_{i:02d}"
        if not (path / "adapter_config.json").is_file():
            generator = torch.Generator().manual_seed(seed + i)
            with torch.no_grad():
                for p in factors:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
            bdlora.save_adapter(model, path, format=fmt)
        paths.append(str(path))
    return paths, sum(p.numel() for p in factors)


def max_model_len(args: argparse.Namespace) -> int:
    return max(128, 32 * math.ceil((args.prompt_len + args.max_tokens + 8) / 32))


# -- one engine (serving venv) ---------------------------------------------------------------------------
def lora_layers(worker) -> dict:
    """On a TP worker: per LoRA layer class, how many, the buffer shapes of the last one, and (plugin
    layers) the fewest BD-LoRA slots and the most dense slots any of them holds."""
    try:
        model = worker.model_runner.get_model()
    except Exception:  # noqa: BLE001 - older runners
        model = worker.model_runner.model
    found: dict = {}
    for module in model.modules():
        if not hasattr(module, "lora_a_stacked"):
            continue
        entry = found.setdefault(type(module).__name__, {"count": 0})
        entry["count"] += 1
        entry["a_shape"] = list(module.lora_a_stacked[0].shape)  # (max_loras, 1, rank, d_in)
        entry["b_shape"] = list(module.lora_b_stacked[0].shape)  # (max_loras, 1, d_out, rank)
        if hasattr(module, "bd_a_stacked"):
            entry["bd_a_shape"] = list(module.bd_a_stacked[0].shape)
            entry["bd_b_shape"] = list(module.bd_b_stacked[0].shape)
            entry["bd_slots"] = min(entry.get("bd_slots", len(module.bd_slots)), len(module.bd_slots))
            entry["dense_slots"] = max(entry.get("dense_slots", 0), len(module.dense_slots))
    return found


def engine_kwargs(spec: dict, on_cpu: bool) -> dict:
    """``LLM`` arguments of one (TP, mode) engine."""
    dtype = spec["dtype"] if spec["dtype"] != "auto" else ("float32" if on_cpu else "bfloat16")
    kwargs = dict(
        model=spec["model"],
        tensor_parallel_size=spec["tp"],
        dtype=dtype,
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["batch"],
        enforce_eager={"yes": True, "no": False}.get(spec["eager"], on_cpu),
        enable_prefix_caching=False,  # every repetition prefills as the first did
        disable_log_stats=False,  # per-request timestamps, for TPOT
        kv_cache_memory_bytes=spec["kv_cache_bytes"],  # small: several engines live side by side
        seed=0,
    )
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    if spec["mode"] != "base":
        kwargs.update(
            enable_lora=True,
            max_lora_rank=spec["max_lora_rank"],
            max_loras=max(spec["adapter_counts"]),
            fully_sharded_loras=spec["mode"] == "slora",
        )
    return kwargs


def tpot_ms(outs) -> float | None:
    """Median over the requests of (last token - first token) / (tokens - 1), from vLLM's metrics."""
    tpots = [
        (o.metrics.last_token_ts - o.metrics.first_token_ts) / (o.metrics.num_generation_tokens - 1)
        for o in outs
        if getattr(o, "metrics", None) is not None and o.metrics.num_generation_tokens > 1
    ]
    return 1e3 * statistics.median(tpots) if len(tpots) == len(outs) else None


def run_config(llm, spec: dict, lora) -> dict:
    """One timed generate call of the whole batch: tokens/s, TPOT, and the greedy tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]

    def generate(max_tokens: int) -> tuple[float, list]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - start, outs

    wall, outs = generate(spec["max_tokens"])
    generated = [list(o.outputs[0].token_ids) for o in outs]
    count = sum(len(t) for t in generated)
    sample = {"wall_s": wall, "tokens": count, "tokens_per_s": count / wall, "tpot_ms": tpot_ms(outs)}
    sample["tpot_from"] = "metrics"
    if sample["tpot_ms"] is None:  # no per-request metrics: (total - time to first token) / (tokens - 1)
        sample["tpot_ms"] = 1e3 * (wall - generate(1)[0]) / (spec["max_tokens"] - 1)
        sample["tpot_from"] = "timings"
    return {"sample": sample, "token_ids": generated}


def worker_main(spec_path: str) -> None:
    """One engine, driven over stdin: ``{"cmd": "run", "config": N}`` times the batch with N distinct
    adapters (0: no LoRA request), ``{"cmd": "finish"}`` reports the LoRA layers and ends. Replies
    are JSON lines on the original stdout; everything else (vLLM's logs) goes to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")

    try:
        for key, value in spec_env().items():
            os.environ.setdefault(key, value)
        import torch
        import vllm
        from vllm import LLM
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform

        spec = json.loads(Path(spec_path).read_text())
        kwargs = engine_kwargs(spec, current_platform.is_cpu())
        started = time.perf_counter()
        llm = LLM(**kwargs)
        requests = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(spec["adapters"])]
        configs: dict[str, list | None] = {"0": None}  # no LoRA request: the base model, in this engine
        for n in spec["adapter_counts"] if spec["mode"] != "base" else []:
            configs[str(n)] = [requests[i % n] for i in range(spec["batch"])]  # round-robin
        reply(
            {
                "engine_start_s": time.perf_counter() - started,
                "dtype": kwargs["dtype"],
                "enforce_eager": kwargs["enforce_eager"],
                "vllm": vllm.__version__,
                "torch": torch.__version__,
                "device": "cpu" if current_platform.is_cpu() else str(current_platform.get_device_name()),
                "plugins": os.environ.get("VLLM_PLUGINS"),
            }
        )
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "run":
                reply(run_config(llm, spec, configs[cmd["config"]]))
            elif cmd["cmd"] == "finish":
                reply({"layers": llm.collective_rpc(lora_layers) if spec["mode"] != "base" else []})
                break
    except BaseException:
        reply({"error": traceback.format_exc()})
        raise


def spec_env() -> dict[str, str]:
    """vLLM on a few CPU cores: one thread per worker (TP hangs on 2 cores otherwise), and functions
    sent to the workers by collective_rpc. An explicit setting wins."""
    return {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }


class Engine:
    """A worker process (this file with ``--worker``, the serving venv's python) and its engine."""

    def __init__(self, args: argparse.Namespace, spec: dict, workdir: Path) -> None:
        self.name = f"TP {spec['tp']} {spec['mode']}"
        stem = workdir / f"tp{spec['tp']}_{spec['mode']}"
        self.log_path = stem.with_suffix(".log")
        stem.with_suffix(".spec.json").write_text(json.dumps(spec))
        self.timeout = args.engine_timeout
        env = {**spec_env(), **os.environ}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        env["VLLM_PLUGINS"] = "bdlora" if spec["mode"] == "bdlora" else ""  # stock vLLM but for BD-LoRA
        command = [args.serve_python, str(Path(__file__).resolve()), "--worker", str(stem) + ".spec.json"]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.info = self.receive()

    def receive(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            answer = json.loads(line)
        else:
            answer = {"error": "the worker exited" if ready else f"no answer within {self.timeout:.0f} s"}
        if "error" in answer:
            self.close(kill=True)
            tail = self.log_path.read_text()[-6000:]
            raise SystemExit(f"engine {self.name} failed (log {self.log_path}):\n{tail}\n{answer['error']}")
        return answer

    def request(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def engine_groups(args: argparse.Namespace) -> list[list[str]]:
    """The modes whose engines live side by side (all of them, or one at a time)."""
    return [[mode] for mode in args.modes] if args.one_engine_at_a_time else [list(args.modes)]


def run_group(args: argparse.Namespace, specs: dict[str, dict], workdir: Path, group: int) -> dict:
    """Start the engines one after the other, then time every (mode, adapters) configuration; each
    round runs them all once, in an order that rotates from round to round."""
    engines: dict[str, Engine] = {}
    try:
        for mode, spec in specs.items():
            started = time.perf_counter()
            engines[mode] = Engine(args, spec, workdir)
            print(f"  {engines[mode].name}: engine up in {time.perf_counter() - started:.0f} s", flush=True)
        results = {
            mode: {**spec, **engines[mode].info, "prompts": None, "tokens": {}, "samples": {}}
            for mode, spec in specs.items()
        }
        modes = list(specs)
        counts = {mode: ["0", *(map(str, args.adapters) if mode != "base" else [])] for mode in modes}
        started, previous = time.perf_counter(), None
        for rnd in range(args.warmup + args.reps):
            for mode in rotated(modes, rnd):
                if previous not in (None, mode):
                    time.sleep(args.settle)  # the last engine's workers spin a while after their last call
                previous = mode
                for n in rotated(counts[mode], rnd):
                    answer = engines[mode].request(cmd="run", config=n)
                    res = results[mode]
                    if res["tokens"].setdefault(n, answer["token_ids"]) != answer["token_ids"]:
                        raise AssertionError(
                            f"{engines[mode].name}, {n} adapters: greedy tokens changed between runs"
                        )
                    if rnd >= args.warmup:
                        sample = {**answer["sample"], "round": f"{group}:{rnd}"}
                        res["samples"].setdefault(n, []).append(sample)
        configs = sum(map(len, counts.values()))
        took = time.perf_counter() - started
        print(
            f"  {configs} configurations x {args.warmup + args.reps} rounds in {took:.0f} s",
            flush=True,
        )
        for mode, engine in engines.items():
            results[mode]["layers"] = engine.request(cmd="finish")["layers"]
        return results
    finally:
        for engine in engines.values():
            with contextlib.suppress(OSError):
                engine.proc.stdin.close()  # the worker's end of input: it shuts its engine down
        for engine in engines.values():
            engine.close()


# -- checks and the table -----------------------------------------------------------------------------
def linear_classes(res: dict) -> list[str]:
    """The LoRA classes of the engine's linear layers (vLLM wraps the embedding and logits too)."""
    return sorted({c for worker in res["layers"] for c in worker if "Linear" in c or "BlockDiagonal" in c})


def check_layers(tp: int, mode: str, res: dict) -> str:
    """The layers are those of the mode: vLLM's own, its fully sharded ones, or the plugin's with
    every loaded adapter in the BD-LoRA slots, whose rank is max_lora_rank / TP."""
    classes = linear_classes(res)
    expected = {
        "lora": lambda c: "Sharded" not in c and not c.startswith("BlockDiagonal"),
        "slora": lambda c: "Sharded" in c,
        "bdlora": lambda c: c.startswith("BlockDiagonal"),
    }[mode]
    if not classes or not all(map(expected, classes)):
        raise AssertionError(f"TP {tp} {mode}: unexpected LoRA layers {classes}")
    if mode == "bdlora":
        for rank, worker in enumerate(res["layers"]):
            for cls in classes:
                entry = worker[cls]
                if entry["bd_slots"] < 1 or entry["dense_slots"] != 0:
                    raise AssertionError(f"TP {tp} bdlora, rank {rank}, {cls}: adapters not in BD-LoRA slots")
                if entry["bd_a_shape"][2] * tp != res["max_lora_rank"]:
                    raise AssertionError(f"TP {tp} bdlora, {cls}: BD-LoRA buffers not of rank max/TP")
    return f"TP {tp} {mode}: LoRA layers {', '.join(classes)}"


def check_results(results: dict[tuple[int, str], dict], dtype_exact: bool) -> list[str]:
    """Raise if a run could have measured nothing; return lines that say what was checked."""
    notes = []
    for (tp, mode), res in sorted(results.items()):
        if mode == "base":
            continue
        for n, tokens in res["tokens"].items():
            if n != "0" and tokens == res["tokens"]["0"]:
                raise AssertionError(
                    f"TP {tp} {mode}, {n} adapters: greedy tokens equal the base model's on every "
                    "request; the adapters did not reach the model"
                )
        base = results.get((tp, "base"))
        if base is not None:
            same = res["tokens"]["0"] == base["tokens"]["0"]
            if not same and dtype_exact:
                raise AssertionError(
                    f"TP {tp} {mode}: requests without LoRA do not give the base engine's tokens; "
                    "the engines do not serve the same model and prompts"
                )
            notes.append(f"TP {tp} {mode}: requests without LoRA give the base engine's tokens: {same}")
        notes.append(check_layers(tp, mode, res))
    for tp in sorted({tp for tp, _ in results}):
        lora, slora, bd = (results.get((tp, m)) for m in LORA_MODES)
        if lora is None:
            continue
        for n, tokens in lora["tokens"].items():
            if n == "0":
                continue
            if slora is not None:
                same = sum(a == b for a, b in zip(tokens, slora["tokens"][n]))
                notes.append(f"TP {tp}, {n} adapters: lora and slora agree on {same}/{len(tokens)} requests")
            if bd is not None:
                differ = sum(a != b for a, b in zip(tokens, bd["tokens"][n]))
                notes.append(
                    f"TP {tp}, {n} adapters: bdlora and lora differ on {differ}/{len(tokens)} requests"
                )
    return notes


def summary(samples: list[dict], key: str) -> dict:
    values = [s[key] for s in samples]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired(samples: list[dict], reference: list[dict]) -> float | None:
    """Median over the rounds of the per-round tokens/s ratio (None unless both ran in the same rounds)."""
    ref = {r.get("round"): r["tokens_per_s"] for r in reference}
    ratios = [s["tokens_per_s"] / ref[s.get("round")] for s in samples if s.get("round") in ref]
    return statistics.median(ratios) if ratios else None


def table_rows(results: dict[tuple[int, str], dict], counts: list[int]) -> list[dict]:
    """One row per (TP, adapters, mode). Ratios are of median tokens/s at the same TP and adapters,
    with the median of the per-round ratios beside them (``paired_*``)."""
    rows = []
    for tp in sorted({tp for tp, _ in results}):
        samples = {
            (mode, n): s for (t, mode), res in results.items() if t == tp for n, s in res["samples"].items()
        }
        median = {key: statistics.median(s["tokens_per_s"] for s in value) for key, value in samples.items()}
        for n in ["0", *map(str, counts)]:
            for mode in MODES:
                if (mode, n) not in samples:
                    continue
                row = {
                    "tp": tp,
                    "mode": mode,
                    "adapters": int(n),
                    "tokens_per_s": summary(samples[(mode, n)], "tokens_per_s"),
                    "tpot_ms": summary(samples[(mode, n)], "tpot_ms"),
                }
                refs = {"base": ("base", "0")}
                if mode == "bdlora":
                    refs.update(slora=("slora", n), lora=("lora", n))
                for name, ref in refs.items():
                    found = ref in samples
                    row[f"vs_{name}"] = median[(mode, n)] / median[ref] if found else None
                    row[f"paired_vs_{name}"] = paired(samples[(mode, n)], samples[ref]) if found else None
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def spread(s: dict, fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    def ratio(row: dict, name: str) -> str:
        value, pair = row.get(f"vs_{name}"), row.get(f"paired_vs_{name}")
        if value is None:
            return ""
        return f"{value:.3f}" if pair is None else f"{value:.3f} ({pair:.3f})"

    header = ["TP", "mode", "adapters", "tokens/s (min-max)", "TPOT ms (min-max)", "/ base"]
    header += ["BD-LoRA / S-LoRA", "BD-LoRA / LoRA"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [
            str(r["tp"]),
            LABELS[r["mode"]],
            "-" if r["mode"] == "base" else str(r["adapters"]),
            spread(r["tokens_per_s"], ".1f"),
            spread(r["tpot_ms"], ".2f"),
            ratio(r, "base"),
            ratio(r, "slora"),
            ratio(r, "lora"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------
def build_inputs(args: argparse.Namespace, workdir: Path) -> dict:
    """The base model, the dense and BD-LoRA adapters (counts checked against the formulas), the prompts."""
    import torch

    sizes = f"h{args.hidden}_i{args.intermediate}_l{args.layers}_a{args.heads}_kv{args.kv_heads}"
    base = build_model(args, workdir / f"base_{sizes}")
    shapes = module_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads)
    bd_rank = args.bd_rank or matched_bd_rank(shapes, args.rank, args.nblocks)
    count, std, out = max(args.adapters), args.init_std, workdir / f"adapters_{sizes}_std{args.init_std}"
    dense_paths, dense_numel = build_adapters(base, out, args.rank, 1, count, std, 1000)
    bd_paths, bd_numel = build_adapters(base, out, bd_rank, args.nblocks, count, std, 2000)
    params = {
        "dense_rank": args.rank,
        "dense": dense_params(shapes, args.rank, args.layers),
        "bd_rank": bd_rank,
        "bd": bd_params(shapes, bd_rank, args.nblocks, args.layers),
    }
    if (dense_numel, bd_numel) != (params["dense"], params["bd"]):
        raise AssertionError(
            f"adapter sizes {dense_numel:,} and {bd_numel:,} do not match the formulas {params}"
        )
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 256, (args.batch, args.prompt_len), generator=generator).tolist()
    return {
        "base": base,
        "dense_paths": dense_paths,
        "bd_paths": bd_paths,
        "params": params,
        "prompts": prompts,
    }


def kv_cache_bytes(args: argparse.Namespace) -> int:
    """KV cache per worker: the whole batch at full length, twice over, in fp32 (at least 32 MiB)."""
    if args.kv_cache_mib:
        return args.kv_cache_mib * 2**20
    per_token = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * 4
    return max(32 * 2**20, 2 * per_token * args.batch * max_model_len(args))


def run_engines(args: argparse.Namespace, inputs: dict, workdir: Path) -> dict[tuple[int, str], dict]:
    """Per TP degree, the engines of every mode side by side (``--one-engine-at-a-time``: in turn)."""
    common = {
        "model": str(inputs["base"]),
        "prompts": inputs["prompts"],
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "max_model_len": max_model_len(args),
        "adapter_counts": args.adapters,
        "dtype": args.dtype,
        "eager": args.eager,
        "kv_cache_bytes": kv_cache_bytes(args),
    }
    results: dict[tuple[int, str], dict] = {}
    for tp in args.tp:
        for index, group in enumerate(engine_groups(args)):
            specs = {}
            for mode in group:
                bd = mode == "bdlora"
                specs[mode] = {
                    **common,
                    "mode": mode,
                    "tp": tp,
                    "adapters": inputs["bd_paths"] if bd else inputs["dense_paths"],
                    "max_lora_rank": vllm_max_lora_rank(inputs["params"]["bd_rank"] if bd else args.rank),
                    "gpu_memory_utilization": round(0.85 / len(group), 3),
                }
            for mode, res in run_group(args, specs, workdir, index).items():
                results[(tp, mode)] = res
    return results


def describe(args: argparse.Namespace, params: dict) -> list[str]:
    return [
        f"model: Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads ({args.kv_heads} KV) of dim {args.hidden // args.heads}, vocabulary 256; "
        f"batch {args.batch} x (prompt {args.prompt_len} + {args.max_tokens} decoded tokens), "
        f"{args.reps} timed repetitions after {args.warmup} warm-up",
        f"adapters on all 7 projections: dense rank {params['dense_rank']}, {params['dense']:,} parameters; "
        f"BD-LoRA rank {params['bd_rank']}, nblocks {args.nblocks}, {params['bd']:,} parameters; "
        f"BD-LoRA / dense = {params['bd'] / params['dense']:.3f}",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    check_args(args)
    if not Path(args.serve_python).is_file():
        raise SystemExit(
            f"no serving python at {args.serve_python}: run `make setup-serve` or pass --serve-python"
        )
    import torch

    started = time.perf_counter()
    print("$ python " + shlex.join(sys.argv))
    machine = {"cpu": cpu_model(), "cores": cores(), "load_start": load_average()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; load average {machine['load_start']}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_serve_"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(args, workdir)
    print("\n".join(describe(args, inputs["params"])), flush=True)
    results = run_engines(args, inputs, workdir)

    first = next(iter(results.values()))
    notes = check_results(results, dtype_exact=first["dtype"] == "float32")
    rows = table_rows(results, args.adapters)
    machine["load_end"] = load_average()
    machine["device"] = first["device"]
    versions = {
        "torch (trainer)": torch.__version__,
        "vllm": first["vllm"],
        "torch (serving)": first["torch"],
    }
    print()
    print(markdown(rows))
    print()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, device {machine['device']}; load average "
        f"{machine['load_start']} at start, {machine['load_end']} at end; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; {first['dtype']}, enforce_eager={first['enforce_eager']}; TPOT from "
        f"{first['samples']['0'][0]['tpot_from']}; {time.perf_counter() - started:.0f} s in all"
    )
    print(
        "adapters 0: the LoRA engine serving the batch without LoRA requests. Ratios: of median tokens/s"
        + (" (in brackets: median of the per-round ratios)" if not args.one_engine_at_a_time else "")
    )
    if any(mode != "base" for _, mode in results):
        print(
            "checks: in every LoRA mode, each adapter count changes the greedy tokens of at least one request"
        )
    for note in notes:
        print(f"  {note}")
    if args.json:
        report = {
            "command": "python " + shlex.join(sys.argv),
            "machine": machine,
            "versions": versions,
            "config": {k: v for k, v in vars(args).items() if k != "worker"},
            "params": inputs["params"],
            "rows": rows,
            "notes": notes,
            "engines": {f"tp{tp}_{mode}": res for (tp, mode), res in results.items()},
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.workdir:  # a temp dir of the script's own: gone after a successful run, kept after a failure
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
