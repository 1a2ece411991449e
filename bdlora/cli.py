"""``bdlora`` command line: ``plan`` (what would be adapted, and how), ``demo``, and for a trained run
``export`` (PEFT adapter or merged model) and ``generate`` (greedy completions; several prompts and
adapters in one batch); for a ``bdlora-train -m`` sweep ``sweep-report`` (a table and plot of its
runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bdlora.config import BDLoraConfig, BDLoraConfigError
from bdlora.memory import (
    DTYPES,
    SHARDING_NAMES,
    adapter_flops_per_token,
    adapter_params_per_rank,
    describe,
    memory_notes,
    memory_plans,
    tp_grad_sum_params,
)
from bdlora.plan import Plan, resolve_plan
from bdlora.presets import PRESETS, build_model
from bdlora.train.checkpoint import CheckpointDamaged
from bdlora.train.export import ExportError
from bdlora.train.sweep_report import SweepDirError


def _load_config(source: str | None) -> BDLoraConfig:
    if source is None:
        return BDLoraConfig()
    if Path(source).name == "adapter_config.json" or (Path(source) / "adapter_config.json").is_file():
        from bdlora.peft_io import read_adapter_config  # noqa: PLC0415

        return read_adapter_config(Path(source).parent if Path(source).is_file() else source)
    if Path(source).is_dir():
        raise BDLoraConfigError(
            f"--config {source!r} is a directory without adapter_config.json: give a BD-LoRA YAML file, "
            f"or a PEFT adapter directory (one holding adapter_config.json)"
        )
    if not Path(source).is_file():
        raise FileNotFoundError(f"--config {source!r}: no such file")
    return BDLoraConfig.from_yaml(source)


def _from_trainer_settings(overrides: list[str]) -> tuple[BDLoraConfig, str | None]:
    """The adapter config (and the model preset or directory) ``bdlora-train`` would use with
    these Hydra overrides, e.g. ``adapter=per_layer adapter.groups.attn.rank=4``."""
    from hydra import compose, initialize_config_module  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415

    from bdlora.train.config import (  # noqa: PLC0415
        TrainConfigError,
        describe_hydra_error,
        load_train_config,
        register_configs,
    )

    register_configs()
    try:
        with initialize_config_module("bdlora.conf", version_base="1.3"):
            train = load_train_config(compose("config", overrides=overrides))
    except HydraException as err:
        raise BDLoraConfigError(f"trainer settings: {describe_hydra_error(err)}") from None
    except TrainConfigError as err:
        raise BDLoraConfigError(f"trainer settings: {err}") from None
    model = {"preset": train.model.name, "path": train.model.path}.get(str(train.model.source))
    return train.adapter.build(), model


def cmd_plan(args: argparse.Namespace) -> int:
    if args.overrides and args.config:
        raise BDLoraConfigError("give either --config or trainer settings (adapter.*=...), not both")
    config, trainer_model = _from_trainer_settings(args.overrides) if args.overrides else (None, None)
    config = config or _load_config(args.config)
    args.model = args.model or trainer_model or "tiny-llama"
    if args.model in PRESETS:
        model = build_model(args.model, device="meta")
    elif Path(args.model).is_dir():
        import torch  # noqa: PLC0415
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    else:
        raise FileNotFoundError(
            f"--model {args.model!r} is neither a model directory nor a preset ({', '.join(PRESETS)})"
        )
    if args.tp < 1:
        raise BDLoraConfigError(f"--tp {args.tp}: the TP degree must be a positive integer")
    if args.ep < 1 or args.tp % args.ep:
        valid = [d for d in range(1, args.tp + 1) if args.tp % d == 0]
        raise BDLoraConfigError(
            f"--ep {args.ep}: expert parallelism splits the experts over the TP ranks, so it must divide "
            f"--tp {args.tp}; valid: {valid}"
        )
    _check_memory_options(args)
    from bdlora.parallel.styles import sharding_class  # noqa: PLC0415

    sharding = sharding_class(args.sharding or "bdlora")  # --sharding: --memory only
    plan = resolve_plan(model, sharding.adapter_config(config))  # slora, replicated: dense (nblocks 1)
    blocks = None
    if args.tp > 1:
        from bdlora.experts import experts_modules  # noqa: PLC0415
        from bdlora.parallel.sharding import (
            check_adapter_plan,  # noqa: PLC0415
            check_model_tp,  # noqa: PLC0415
        )

        blocks, layouts = check_model_tp(model, args.tp, sharding, args.ep)
        check_adapter_plan(plan, args.tp, sharding, layouts, dict(experts_modules(model)), args.ep)
    if args.memory:
        return _print_memory(args, model, plan)
    print(plan.format(tp=args.tp))
    if blocks:
        from bdlora.parallel.placement import format_blocks  # noqa: PLC0415

        print(format_blocks(blocks, args.tp))
    return 0


_MEMORY_DEFAULTS = {"seq_len": 4096, "micro_batch": 1, "dtype": "bfloat16"}


def _check_memory_options(args: argparse.Namespace) -> None:
    """The --memory options: only with --memory, and a sequence that splits over --tp (the table's
    sequence-parallel column needs it)."""
    given = [k for k in (*_MEMORY_DEFAULTS, "activation_checkpointing", "sharding") if getattr(args, k)]
    if not args.memory:
        if given:
            options = ", ".join("--" + k.replace("_", "-") for k in given)
            raise BDLoraConfigError(f"{options}: these options plan memory; add --memory")
        return
    for key, default in _MEMORY_DEFAULTS.items():
        setattr(args, key, getattr(args, key) or default)
    if args.seq_len % args.tp:
        raise BDLoraConfigError(
            f"--seq-len {args.seq_len} is not divisible by --tp {args.tp}: sequence parallelism (the last "
            f"column) splits the sequence over the TP ranks; use a multiple of {args.tp}"
        )


def _print_memory(args: argparse.Namespace, model, plan: Plan) -> int:
    sharding = args.sharding or "bdlora"
    plans = memory_plans(
        model,
        plan,
        args.tp,
        sharding=sharding,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        ep=args.ep,
    )
    print(
        f"{args.model}: {len(plan.modules)} adapted modules, "
        f"{adapter_params_per_rank(plan, args.tp, sharding):,} adapter params/rank"
    )
    print(_sharding_line(plan, args.tp, sharding, next(iter(plans.values())).dtype.itemsize))
    print(describe(plans))
    for note in memory_notes(model, args.tp, sharding):
        print(f"note: {note}")
    return 0


def _sharding_line(plan: Plan, tp: int, sharding: str, itemsize: int) -> str:
    """The adapter's unsharded size, its training FLOPs per token on a rank against the frozen
    linears' it adapts, and the gradient sum over TP that the sharding adds to a step."""
    from bdlora.memory import format_bytes  # noqa: PLC0415

    kind = "BD-LoRA" if sharding == "bdlora" else "dense LoRA"
    line = f"sharding {sharding}: {plan.params:,} adapter params unsharded ({kind})"
    if not any(m.experts for m in plan.modules):
        base, adapter = adapter_flops_per_token(plan, tp, sharding)
        line += (
            f"; training FLOPs per token and rank: adapter {adapter:,}, {100 * adapter / base:.2f}% of the "
            f"adapted frozen linears' {base:,}"
        )
    summed = tp_grad_sum_params(plan, tp, sharding)
    if summed:
        line += (
            f"; backward adds one all-reduce over TP of {summed:,} whole-factor gradients "
            f"({format_bytes(summed * itemsize)} per step)"
        )
    elif tp > 1:
        line += "; no gradient sum over TP"
    return line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from bdlora.demo import run_demo  # noqa: PLC0415

    losses = run_demo(args.steps, args.out)
    return 0 if losses[-1] < losses[0] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from bdlora.train.export import ENGINES, MARKER, export  # noqa: PLC0415

    run = export(args.run, args.format, args.out, force=args.force)
    print(f"exported {run.checkpoint} (step {run.step}) as {args.format} to {args.out}")
    print(f"loads in: {ENGINES[args.format]}")
    if args.format == "merged":
        record = json.loads((Path(args.out) / MARKER).read_text())
        print(f"tokenizer: {record['tokenizer']} (AutoTokenizer.from_pretrained({args.out!r}) loads it)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise BDLoraConfigError(
            f"--max-new-tokens {args.max_new_tokens}: give a positive number of tokens to generate"
        )
    for prompt in args.prompt:
        if not prompt.strip():
            raise BDLoraConfigError(f"--prompt {prompt!r} is empty: give the text to continue")
    if len(args.prompt) == 1 and not args.adapter and args.adapter_names is None:
        from bdlora.train.export import generate  # noqa: PLC0415

        text = generate(
            args.run, args.prompt[0], args.max_new_tokens, adapter=not args.no_adapter, raw=args.raw
        )
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    return _generate_batch(args)


def _generate_batch(args: argparse.Namespace) -> int:
    """Several prompts, or several adapters: one batch, each prompt by its own adapter."""
    from bdlora.train.generation import generate_batch, parse_adapter_option  # noqa: PLC0415

    adapters = dict(parse_adapter_option(text) for text in args.adapter or [])
    if len(adapters) != len(args.adapter or []):
        raise BDLoraConfigError("--adapter: each NAME may be given once")
    names = None if args.adapter_names is None else [n.strip() for n in args.adapter_names.split(",")]
    completions = generate_batch(
        args.run,
        args.prompt,
        args.max_new_tokens,
        adapters=adapters,
        adapter_names=names,
        run_adapter=not args.no_adapter,
        raw=args.raw,
    )
    for i, (name, text) in enumerate(completions):
        print(f"--- prompt {i + 1}/{len(completions)}, adapter {name}")
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def cmd_serve_args(args: argparse.Namespace) -> int:
    from bdlora.serve.launch import serve_args  # noqa: PLC0415

    print("\n".join(serve_args(args.run, args.tp)))
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from bdlora.train.sweep_report import write_sweep_report  # noqa: PLC0415

    report = write_sweep_report(args.sweep_dir, args.out)
    print(report.markdown)
    print(f"wrote {report.markdown_path}, {report.csv_path} and {report.png_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the adapter plan for a model and pattern config")
    plan.add_argument(
        "--model",
        help=f"model dir or preset: {', '.join(PRESETS)} (default: the settings' preset, or tiny-llama)",
    )
    plan.add_argument("--config", help="BD-LoRA YAML config, or a PEFT adapter dir / adapter_config.json")
    plan.add_argument("--tp", type=int, default=1, help="show parameters per rank at this TP degree")
    plan.add_argument(
        "--ep",
        type=int,
        default=1,
        help="MoE models: split the experts over this many groups of the TP ranks (divides --tp)",
    )
    plan.add_argument("--memory", action="store_true", help="print per-rank training memory instead")
    plan.add_argument(
        "--seq-len",
        type=_positive_int,
        help=f"tokens per sequence (--memory; default {_MEMORY_DEFAULTS['seq_len']})",
    )
    plan.add_argument(
        "--micro-batch", type=_positive_int, help="sequences per micro-batch (--memory; default 1)"
    )
    plan.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="parameter and compute dtype (--memory; default bfloat16)",
    )
    plan.add_argument(
        "--activation-checkpointing", action="store_true", help="checkpoint every decoder layer (--memory)"
    )
    plan.add_argument(
        "--sharding",
        choices=SHARDING_NAMES,
        help="adapter sharding over TP (--memory; default bdlora): bdlora splits every factor; slora "
        "and replicated train dense LoRA (nblocks 1), replicated with A of column and B of row layers "
        "whole on every rank",
    )
    plan.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="bdlora-train settings (Hydra overrides) whose adapter to plan, e.g. adapter.groups.mlp.rank=16",
    )
    plan.set_defaults(func=cmd_plan)
    demo = sub.add_parser("demo", help="train a tiny Llama with BD-LoRA for a few steps")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--out", default="outputs/demo_adapter", help="where to save the adapter")
    demo.set_defaults(func=cmd_demo)
    run_help = "a bdlora-train run dir (its newest complete checkpoint) or a checkpoint dir"
    export = sub.add_parser("export", help="write a trained run's adapter (PEFT) or merged model (HF)")
    export.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=run_help)
    export.add_argument(
        "--format", default="peft-bdlora", help="peft-bdlora (default), peft-lora or merged (full HF model)"
    )
    export.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export)")
    export.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    export.set_defaults(func=cmd_export)
    gen = sub.add_parser(
        "generate",
        help="greedy completion by a trained run's base model + adapter; several prompts and adapters "
        "in one batch",
    )
    gen.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=run_help + "; its adapter loads as 'default'")
    gen.add_argument(
        "--prompt", required=True, action="append", help="the text to continue; repeat for a batch of prompts"
    )
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--no-adapter", action="store_true", help="do not load the run's own adapter")
    gen.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="also load adapter NAME from DIR: a PEFT adapter dir, or a run or checkpoint trained on the "
        "same base model; repeatable",
    )
    gen.add_argument(
        "--adapter-names",
        metavar="NAME[,NAME...]",
        help="the adapter of each --prompt, in order (one name: every prompt): 'default' (the run's), "
        "an --adapter NAME, or __base__ (the base model alone); default: 'default' (__base__ with "
        "--no-adapter)",
    )
    gen.add_argument("--raw", action="store_true", help="no prompt template (embedded-data runs use one)")
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser(
        "serve-args",
        help="the vLLM server arguments for a run's base model and adapter, one per line "
        "(launch/vllm_serve.sh uses them)",
    )
    serve.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=run_help)
    serve.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to serve at (default 1)")
    serve.set_defaults(func=cmd_serve_args)
    sweep = sub.add_parser("sweep-report", help="one table and plot for a bdlora-train -m sweep directory")
    sweep.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a Hydra multirun dir: multirun/<name>/<stamp>")
    sweep.add_argument("--out", help="where to write sweep_report.{md,csv,png} (default: SWEEP_DIR)")
    sweep.set_defaults(func=cmd_sweep_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        BDLoraConfigError,
        FileNotFoundError,
        KeyError,
        ExportError,
        CheckpointDamaged,
        SweepDirError,
    ) as err:
        print(f"bdlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
