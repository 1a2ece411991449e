"""The quality table: BD-LoRA against standard LoRA on SmolLM2-135M, scored by exact match.

The task is 3-digit addition (``"417+385="`` -> ``"802"``), answer-only loss, greedy decoding.
The held-out questions are drawn first, from their own seed, and no training batch ever contains
one of them. Every method trains the same projections (q, k, v, o, gate, up, down in every layer)
with the same steps, batch, learning rate and scaling (alpha = 2 x rank, per module):

- ``lora``: PEFT's standard LoRA, rank 8;
- ``bdlora``: bdlora's BD-LoRA, nblocks 3, rank 9 (the multiple of 3 nearest 8; fewer parameters);
- ``bdlora_matched``: BD-LoRA, nblocks 3, rank raised to LoRA's exact parameter count (attention
  15, MLP 12).

Each runs with several seeds (adapter init and batch order); the base model's own score is the
first row. The seed-0 ``bdlora`` run is repeated at TP 3 (torchrun, 3 ranks, gloo) to show that
sharded training gives the same numbers. The rank sweep then moves a fixed budget between
attention and MLP, and between the early and late layers.

    python scripts/quality.py                       # everything (about an hour on 2 CPU cores)
    python scripts/quality.py --seeds 0 --no-sweep  # a quicker look
    python scripts/quality.py run --method lora --seed 1 --out run.json   # one run
    python scripts/quality.py report                # the tables of the runs finished so far

Writes ``quality.json`` (every run) and ``quality.md`` (the tables) under ``--out-dir``. Each run
also leaves its own file in ``quality_runs/``; a rerun reuses the runs finished with the same
settings (``--fresh`` reruns everything), so an interrupted table continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rank_main import run_rank, torchrun
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = TARGETS[:4]
MLP = TARGETS[4:]
EVAL_SEED = 12345


@dataclass(frozen=True)
class Method:
    """One adapter set-up: PEFT LoRA, or a bdlora config (global rank plus group/band overrides)."""

    name: str
    label: str
    kind: str  # "lora" (PEFT) or "bdlora"
    rank: int
    groups: dict | None = None
    bands: dict | None = None


def scaled(rank: int) -> dict[str, int]:
    return {"rank": rank, "alpha": 2 * rank}


MAIN = [
    Method("lora", "LoRA (PEFT), rank 8", "lora", 8),
    Method("bdlora", "BD-LoRA, rank 9", "bdlora", 9),
    Method(
        "bdlora_matched",
        "BD-LoRA, attn 15 / MLP 12 (LoRA's count)",
        "bdlora",
        12,
        groups={"attn": {"modules": ATTN, **scaled(15)}, "mlp": {"modules": MLP, **scaled(12)}},
    ),
]


def sweep_methods(layers: int) -> list[Method]:
    """BD-LoRA at about ``bdlora_matched``'s budget, the rank moved between groups or layer bands."""
    half = layers // 2
    early, late = f"0-{half - 1}", f"{half}-{layers - 1}"

    def groups(attn: int, mlp: int) -> dict:
        return {"attn": {"modules": ATTN, **scaled(attn)}, "mlp": {"modules": MLP, **scaled(mlp)}}

    def bands(first: int, second: int) -> dict:
        return {"early": {"layers": early, **scaled(first)}, "late": {"layers": late, **scaled(second)}}

    return [
        Method("attn_heavy", "attn 18 / MLP 9", "bdlora", 12, groups=groups(18, 9)),
        Method("mlp_heavy", "attn 9 / MLP 18", "bdlora", 12, groups=groups(9, 18)),
        Method("early_heavy", f"layers {early}: 18, {late}: 9", "bdlora", 12, bands=bands(18, 9)),
        Method("late_heavy", f"layers {early}: 9, {late}: 18", "bdlora", 12, bands=bands(9, 18)),
    ]


# -- the task --------------------------------------------------------------------------------------


def question(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(100, 1000), rng.randrange(100, 1000)


def eval_set(n: int) -> list[tuple[int, int]]:
    rng = random.Random(EVAL_SEED)
    seen: set[tuple[int, int]] = set()
    while len(seen) < n:
        seen.add(question(rng))
    return sorted(seen)


def train_batches(seed: int, batch: int, held_out: set[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    rng = random.Random(seed)
    while True:
        items = []
        while len(items) < batch:
            q = question(rng)
            if q not in held_out:
                items.append(q)
        yield items


def prompt(q: tuple[int, int]) -> str:
    return f"{q[0]}+{q[1]}="


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask: every sequence ends at the last column."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions; positions count from each row's first real token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits


def train_loss(model: nn.Module, tokenizer, items: list[tuple[int, int]]) -> torch.Tensor:
    """Cross-entropy on the answer and its end-of-sequence token only."""
    eos = tokenizer.eos_token
    ids, mask = encode(tokenizer, [f"{prompt(q)}{q[0] + q[1]}{eos}" for q in items])
    answer_len = [len(tokenizer(f"{q[0] + q[1]}{eos}", add_special_tokens=False)["input_ids"]) for q in items]
    keep = max(answer_len) + 1
    logits = forward(model, ids, mask, keep)[:, :-1]  # predictions of the last keep - 1 tokens
    targets = ids[:, -keep + 1 :].clone()
    for i, n in enumerate(answer_len):
        targets[i, : keep - 1 - n] = -100
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, questions: list[tuple[int, int]], batch: int = 100) -> float:
    """Exact match of greedy answers (up to 5 tokens or end of sequence)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        ids, mask = encode(tokenizer, [prompt(q) for q in chunk])
        new: list[list[int]] = [[] for _ in chunk]
        for _ in range(5):
            nxt = forward(model, ids, mask, 1)[:, -1].argmax(-1)
            for row, token in zip(new, nxt.tolist()):
                row.append(token)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        for q, row in zip(chunk, new):
            answer = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            correct += tokenizer.decode(answer).strip() == str(q[0] + q[1])
    model.train(was_training)
    return correct / len(questions)


# -- one run ---------------------------------------------------------------------------------------


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from bdlora.train.config import ModelConfig
    from bdlora.train.modeling import resolve_model_dir

    cache = Path(os.environ.get("HOME", "/tmp")) / ".cache" / "bdlora"  # the trainer's model.cache_dir
    return resolve_model_dir(ModelConfig(source="smollm2", cache_dir=str(cache)), is_main=True)


def bdlora_config(method: Method, nblocks: int):
    import bdlora

    return bdlora.BDLoraConfig.from_dict(
        {
            "rank": method.rank,
            "alpha": 2 * method.rank,
            "nblocks": nblocks,
            "target_modules": TARGETS,
            "groups": method.groups or {},
            "bands": method.bands or {},
        }
    )


def build(method: Method, args: argparse.Namespace, path: Path) -> tuple[nn.Module, int]:
    """The adapted model (bdlora: parallelized over every rank as TP) and its adapter param count."""
    torch.manual_seed(args.seed)
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(
            base, LoraConfig(r=method.rank, lora_alpha=2 * method.rank, target_modules=TARGETS)
        )
        return model.train(), sum(p.numel() for p in model.parameters() if p.requires_grad)
    import bdlora
    from bdlora.parallel import ParallelDims, build_mesh, init_distributed

    world = init_distributed()
    mesh = build_mesh(ParallelDims(world, tp=world))
    config = bdlora_config(method, args.nblocks)
    model = bdlora.from_pretrained(path, config, mesh=mesh, seed=args.seed).train()
    return model, bdlora.state_of(model).adapters["default"].plan.params


def run_one(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    path = model_dir(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    method = ALL_METHODS(args.layers)[args.method]
    model, params = build(method, args, path)
    questions = eval_set(args.eval)
    batches = train_batches(1000 + args.seed, args.batch, set(questions))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.0, 1 - s / args.steps)
    )
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_loss(model, tokenizer, next(batches))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    result = {
        "method": method.name,
        "seed": args.seed,
        "tp": int(os.environ.get("WORLD_SIZE", "1")),
        "params": params,
        "accuracy": accuracy(model, tokenizer, questions),
        "losses": losses,
        "train_s": seconds,
        "settings": settings(args),
    }
    if int(os.environ.get("RANK", "0")) == 0 and args.out:
        partial = Path(f"{args.out}.partial")
        partial.write_text(json.dumps(result))
        partial.replace(args.out)  # a run's file is whole or absent
    return result


def settings(args: argparse.Namespace) -> dict:
    """What a run's result depends on besides its method, seed and TP degree."""
    keys = ("steps", "batch", "lr", "warmup", "eval", "nblocks", "layers", "model_dir")
    return {key: getattr(args, key) for key in keys}


def base_accuracy(args: argparse.Namespace) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return accuracy(model, AutoTokenizer.from_pretrained(path), eval_set(args.eval))


def ALL_METHODS(layers: int) -> dict[str, Method]:  # noqa: N802 - a table, read like a constant
    return {m.name: m for m in MAIN + sweep_methods(layers)}


# -- everything ------------------------------------------------------------------------------------


def common_args(args: argparse.Namespace) -> list[str]:
    out = [
        f"--steps={args.steps}",
        f"--batch={args.batch}",
        f"--lr={args.lr}",
        f"--warmup={args.warmup}",
        f"--eval={args.eval}",
        f"--nblocks={args.nblocks}",
        f"--layers={args.layers}",
    ]
    return out + ([f"--model-dir={args.model_dir}"] if args.model_dir else [])


def launch(args: argparse.Namespace, method: str, seed: int, tp: int, out: Path) -> dict | None:
    """One run in its own process (torchrun for TP > 1), so every run starts from a clean state;
    a run finished earlier with the same settings is reused, and ``report`` runs nothing."""
    one = [__file__, "run", f"--method={method}", f"--seed={seed}", f"--out={out}", *common_args(args)]
    if tp == 1:
        cmd = [sys.executable, *one, f"--threads={args.threads}"]
    else:
        cmd = [*torchrun(tp, *one), "--threads=1"]
    print(f"  {method} seed {seed} tp {tp} ...", end="", flush=True)
    earlier = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
    if earlier is not None and earlier.get("settings") == settings(args):
        print(" (finished earlier)", end="")
    elif args.mode == "report":
        print(" not run yet", flush=True)
        return None
    else:
        subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    print(f" accuracy {result['accuracy']:.3f}, {result['train_s']:.0f} s", flush=True)
    return result


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: list[tuple[str, int, list[float]]], lora_params: int) -> list[str]:
    lines = [
        "| adapter | params | params / LoRA | exact match, % (mean ± sd) | per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for label, params, accs in rows:
        if not accs:
            lines.append(f"| {label} | - | - | not run yet | |")
            continue
        share = f"{params / lora_params:.3f}" if params and lora_params else "-"
        seeds = ", ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {label} | {params:,} | {share} | {mean_spread(accs)} | {seeds} |")
    return lines


def run_all(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    runs_dir = out_dir / "quality_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["scripts/quality.py", *(a for a in sys.argv[1:] if a != "report")])
    print(f"$ {command}")
    results: list[dict] = []
    base = base_accuracy(args)
    print(f"  base model: accuracy {base:.3f}", flush=True)
    methods = ALL_METHODS(args.layers)
    for name in [m.name for m in MAIN]:
        for seed in args.seeds:
            results.append(launch(args, name, seed, 1, runs_dir / f"{name}_s{seed}_tp1.json"))
    results = [r for r in results if r is not None]
    tp_check = None
    if args.tp_check:
        sharded = launch(
            args,
            "bdlora",
            args.seeds[0],
            args.nblocks,
            runs_dir / f"bdlora_s{args.seeds[0]}_tp{args.nblocks}.json",
        )
        single = [r for r in results if r["method"] == "bdlora" and r["seed"] == args.seeds[0]]
        if sharded is not None and single:
            tp_check = {
                "tp": args.nblocks,
                "accuracy_tp1": single[0]["accuracy"],
                "accuracy_tp": sharded["accuracy"],
                "max_loss_diff": max(abs(a - b) for a, b in zip(single[0]["losses"], sharded["losses"])),
                "max_loss_diff_first_50": max(
                    abs(a - b) for a, b in zip(single[0]["losses"][:50], sharded["losses"][:50])
                ),
            }
            results.append(sharded)
    sweep = [m.name for m in sweep_methods(args.layers)] if args.sweep else []
    for name in sweep:
        for seed in args.sweep_seeds:
            result = launch(args, name, seed, 1, runs_dir / f"{name}_s{seed}_tp1.json")
            results += [result] if result is not None else []

    def row(name: str, seeds: list[int] | None = None) -> tuple[str, int, list[float]]:
        mine = [r for r in results if r["method"] == name and r["tp"] == 1]
        mine = [r for r in mine if seeds is None or r["seed"] in seeds]
        return methods[name].label, mine[0]["params"] if mine else 0, [r["accuracy"] for r in mine]

    lora_params = row("lora")[1]
    lines = [
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M-Instruct, 3-digit addition, {args.steps} steps of {args.batch} questions, AdamW lr "
        f"{args.lr} (warm-up {args.warmup}, linear decay), exact match on {args.eval} held-out questions, "
        f"greedy. Seeds {', '.join(map(str, args.seeds))}.",
        "",
        *table([("base model (no adapter)", 0, [base])] + [row(m.name) for m in MAIN], lora_params),
    ]
    if tp_check:
        tp, sharded, single = tp_check["tp"], tp_check["accuracy_tp"], tp_check["accuracy_tp1"]
        lines += [
            "",
            f"TP {tp} (torchrun, {tp} ranks) against TP 1, BD-LoRA seed {args.seeds[0]}: accuracy "
            f"{100 * sharded:.1f}% vs {100 * single:.1f}%; largest per-step loss difference "
            f"{tp_check['max_loss_diff_first_50']:.1e} over the first 50 steps and "
            f"{tp_check['max_loss_diff']:.1e} over all {args.steps} (fp32 sums in another order, "
            "compounded by training).",
        ]
    if sweep:
        lines += [
            "",
            f"Rank sweep at about LoRA's budget (BD-LoRA, nblocks {args.nblocks}; seeds "
            f"{', '.join(map(str, args.sweep_seeds))}):",
            "",
            *table([row("bdlora_matched", args.sweep_seeds)] + [row(name) for name in sweep], lora_params),
        ]
    (out_dir / "quality.json").write_text(
        json.dumps(
            {"command": command, "base_accuracy": base, "tp_check": tp_check, "runs": results}, indent=1
        )
    )
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "mode",
        nargs="?",
        default="all",
        choices=["all", "run", "report"],
        help="report: the tables of the runs finished so far",
    )
    p.add_argument("--method", default="bdlora", help="run: one of " + ", ".join(ALL_METHODS(30)))
    p.add_argument("--seed", type=int, default=0, help="run: the seed")
    p.add_argument("--out", help="run: where rank 0 writes the result (JSON)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--no-tp-check", dest="tp_check", action="store_false")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval", type=int, default=200, help="held-out questions")
    p.add_argument("--nblocks", type=int, default=3, help="BD-LoRA blocks, and the TP degree of the check")
    p.add_argument("--layers", type=int, default=30, help="the model's layer count, for the band sweep")
    p.add_argument("--model-dir", help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out-dir", default="docs/benchmarks")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="rerun every run (default: reuse a run finished with the same settings)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "run":
        run_rank(run_one, args)  # under torchrun: every rank done before gloo is torn down
    else:
        run_all(args)  # report: the same tables, from the runs finished so far


if __name__ == "__main__":
    main()
