"""``bdlora.memory``: the per-rank memory plan, checked against independent counts (config only)
and against bytes measured in one process (TP 1) and on every rank at TP 2 and 4 (gloo, each
layout): saved activations by a ``saved_tensors_hooks`` counter, parameters, gradients and AdamW
state after one optimizer step."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoModelForCausalLM, LlamaConfig

from bdlora import BDLoraConfig, apply_bdlora, parallelize
from bdlora.cli import main as cli_main
from bdlora.config import BDLoraConfigError
from bdlora.memory import LAYOUTS, MemoryPlan, memory_plan, memory_plans
from bdlora.model import adapter_parameters
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.plan import resolve_plan
from bdlora.presets import build_model, preset_config
from tests.distributed import run_distributed

TOLERANCE = 0.05  # planned saved activations vs measured (docs/memory.md)
BF16 = 2


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def small_llama(**changes) -> LlamaConfig:
    sizes = dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    return LlamaConfig(**{**sizes, **changes})


# -- tier 1: config only -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_8b() -> nn.Module:
    return build_model("llama-3.1-8b", device="meta")


def test_llama_8b_tp8_base_weights_match_a_count_from_the_sizes(llama_8b):
    d, inter, layers, heads, kv_heads, vocab, tp = 4096, 14336, 32, 32, 8, 128256, 8
    kv = kv_heads * d // heads
    linears = d * d + 2 * kv * d + d * d + 3 * inter * d  # q, k + v, o, gate + up + down
    norms = (2 * layers + 1) * d
    plan = resolve_plan(llama_8b, BDLoraConfig(nblocks=8))
    options = dict(seq_len=4096, micro_batch=1, dtype="bfloat16")
    plans = memory_plans(llama_8b, plan, tp, **options)
    sharded = layers * linears // tp + norms
    assert plans["replicated"].base_weights == BF16 * (sharded + 2 * vocab * d)
    assert plans["+ vocab parallel"].base_weights == BF16 * (sharded + 2 * math.ceil(vocab / tp) * d)
    assert plans["+ vocab + sequence parallel"].base_weights == plans["+ vocab parallel"].base_weights


def test_adapter_grads_and_adamw_follow_the_plan(llama_8b):
    plan = resolve_plan(llama_8b, BDLoraConfig(rank=16, nblocks=8))
    p = memory_plan(llama_8b, plan, 8, seq_len=1024, micro_batch=2, dtype="bfloat16")
    per_rank = sum(m.params_per_rank(8) for m in plan.modules)
    assert per_rank == plan.params // 8
    assert p.adapter == p.grads == BF16 * per_rank
    assert p.optimizer == 2 * BF16 * per_rank + 4 * 2 * 7 * 32  # + one fp32 step per A and B


def test_tied_embeddings_count_one_tensor():
    vocab, hidden, tp = 1001, 128, 2  # 1001 rows pad to 2 x 501
    tied, untied = (meta_model(small_llama(vocab_size=vocab, tie_word_embeddings=t)) for t in (True, False))
    plan = resolve_plan(tied, BDLoraConfig())
    options = dict(seq_len=64, micro_batch=1, dtype="float32")
    for vocab_parallel, rows in ((False, vocab), (True, 501)):
        base = {
            name: memory_plan(model, plan, tp, vocab_parallel=vocab_parallel, **options).base_weights
            for name, model in (("tied", tied), ("untied", untied))
        }
        assert base["untied"] - base["tied"] == 4 * rows * hidden


def test_vocab_parallel_shrinks_the_logits_and_sequence_parallel_the_norms(llama_8b):
    plan = resolve_plan(llama_8b, BDLoraConfig(nblocks=8))
    plans = memory_plans(llama_8b, plan, 8, seq_len=4096, micro_batch=1, dtype="bfloat16")
    rep, vp, sp = plans.values()
    vocab, vocab_local, tokens = 128256, 16032, 4096
    # the saved fp32 (log-)softmax, the (N,) targets (and masks) and the loss's divisor (a fp32 total
    # weight, replicated, or the int64 count of targets, vocab parallel), plus the larger of the
    # forward's logits (bf16 + fp32 copy) and backward's gradients (two fp32 for log-softmax; fp32 +
    # its bf16 cast for the vocabulary-parallel softmax)
    assert rep.activation_peak("logits") == tokens * vocab * (4 + max(2 + 4, 4 + 4)) + tokens * 8 + 4
    assert (
        vp.activation_peak("logits") == tokens * vocab_local * (4 + max(2 + 4, 4 + 2)) + tokens * (8 + 2) + 8
    )
    assert vp.activation_bytes("layers") == rep.activation_bytes("layers")
    # 2 norms per layer, minus layer 0's input norm (the frozen embedding needs no gradient), + final
    norms = (2 * 32 - 1 + 1) * (tokens * 4096 + tokens) * 4
    assert rep.activation_bytes("layers") - sp.activation_bytes("layers") == norms * 7 // 8


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer(llama_8b):
    plan = resolve_plan(llama_8b, BDLoraConfig(nblocks=8))
    options = dict(seq_len=4096, micro_batch=1, dtype="bfloat16", vocab_parallel=True, sequence_parallel=True)
    full = memory_plan(llama_8b, plan, 8, **options)
    ckpt = memory_plan(llama_8b, plan, 8, activation_checkpointing=True, **options)
    inputs = 32 * 4096 // 8 * 4096 * BF16
    final_norm = (4096 // 8) * (4096 + 1) * 4
    recompute = ckpt.activation_bytes("layers", "recompute")
    assert ckpt.activation_bytes("layers", "saved") == inputs + final_norm
    assert 0 < recompute < full.activation_bytes("layers") / 30  # one layer of 32
    assert ckpt.activation_peak("logits") == full.activation_peak("logits")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(seq_len=0), "seq_len=0: must be a positive integer"),
        (dict(micro_batch=-1), "micro_batch=-1"),
        (dict(dtype="foo"), "dtype 'foo' is not supported; valid: float32, bfloat16, float16"),
        (dict(sequence_parallel=True), "sequence_parallel=True needs vocab_parallel=True"),
        (
            dict(seq_len=63, vocab_parallel=True, sequence_parallel=True),
            "seq_len=63 is not divisible by tp=2",
        ),
    ],
)
def test_bad_options_name_what_is_valid(options, message):
    model = meta_model(small_llama())
    plan = resolve_plan(model, BDLoraConfig())
    kwargs = dict(seq_len=64, micro_batch=1, dtype="float32") | options
    with pytest.raises(BDLoraConfigError, match=message):
        memory_plan(model, plan, 2, **kwargs)


def test_an_adapter_outside_the_decoder_projections_is_refused():
    model = meta_model(small_llama())
    adapter = BDLoraConfig(target_modules=["q_proj", "lm_head"], patterns={"lm_head": {"role": "column"}})
    plan = resolve_plan(model, adapter)
    with pytest.raises(BDLoraConfigError, match="'lm_head': the memory plan models adapters"):
        memory_plan(model, plan, 1, seq_len=64, micro_batch=1, dtype="float32")


def test_cli_memory_prints_one_row_per_item_and_three_layouts(capsys):
    argv = ["plan", "--model", "tiny-llama", "--tp", "2", "--memory", "--seq-len", "64", "--dtype", "float32"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("per rank "))
    assert re.split(r"\s{2,}", header)[1:] == [
        "replicated",
        "+ vocab parallel",
        "+ vocab + sequence parallel",
    ]
    for row in ("base weights", "adapter", "AdamW state", "grads", "activations: layers", "total"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), row
    assert "activations: logits+loss" in out


def test_cli_plan_without_memory_is_unchanged(capsys):
    assert cli_main(["plan", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    model = build_model("tiny-llama", device="meta")
    assert out == resolve_plan(model, BDLoraConfig()).format() + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory", "--seq-len", "0"], "argument --seq-len: must be a positive integer, got '0'"),
        (["--memory", "--micro-batch", "x"], "argument --micro-batch: must be a positive integer"),
        (["--memory", "--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    ],
)
def test_cli_rejects_bad_memory_options(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["plan", "--model", "tiny-llama", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tp", "2", "--memory", "--seq-len", "63"], "--seq-len 63 is not divisible by --tp 2"),
        (
            ["--seq-len", "64", "--dtype", "float32"],
            "--seq-len, --dtype: these options plan memory; add --memory",
        ),
    ],
)
def test_cli_memory_errors_name_the_option(capsys, argv, message):
    assert cli_main(["plan", "--model", "tiny-llama", *argv]) == 2
    assert message in capsys.readouterr().err


# -- measured in one process (TP 1) ------------------------------------------------------------------
class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while the block runs, leaving out
    the model's parameters and buffers (scripts/benchlib.py's ``SavedTensors`` counts the same way).
    Storages stay referenced until the block ends, so a freed address is never reused and merged."""

    def __init__(self, model: nn.Module) -> None:
        self._model = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(s.nbytes() for ptr, s in self._storages.items() if ptr not in self._model)
        self._storages.clear()


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@dataclass(frozen=True)
class Measured:
    activations: int
    base_weights: int
    adapter: int
    grads: int
    optimizer: int


def measure(config, adapter: BDLoraConfig, seq: int, dtype: torch.dtype, checkpointing: bool) -> Measured:
    """One training step of a fresh model in one process."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    apply_bdlora(model, adapter)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return measure_step(model, config.vocab_size, seq)


def measure_step(model: nn.Module, vocab: int, seq: int) -> Measured:
    """Forward (its saved tensors counted) and backward with labels on batch 2, then AdamW."""
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    tokens = torch.randint(vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    with SavedActivations(model) as saved:
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    return Measured(
        activations=saved.bytes,
        base_weights=storage_bytes(p for p in params if not p.requires_grad),
        adapter=storage_bytes(p for p in params if p.requires_grad),
        grads=storage_bytes(p.grad for p in params if p.grad is not None),
        optimizer=storage_bytes(v for s in optimizer.state.values() for v in s.values()),
    )


PATTERNS = BDLoraConfig(
    patterns={r"layers\.0\.self_attn\..*": None, "up_proj": {"dropout": 0.1}, "down_proj": {"rank": 16}}
)
CASES = {
    "seq 64": (small_llama(), BDLoraConfig(), 64, torch.float32, False),
    "seq 128": (small_llama(), BDLoraConfig(), 128, torch.float32, False),
    "seq 64, nblocks 1 (fused layer)": (small_llama(), BDLoraConfig(nblocks=1), 64, torch.float32, False),
    "seq 64, bf16": (small_llama(), BDLoraConfig(), 64, torch.bfloat16, False),
    "seq 64, eager attention": (
        small_llama(attn_implementation="eager"),
        BDLoraConfig(),
        64,
        torch.float32,
        False,
    ),
    "seq 64, layer 0 attention frozen, dropout": (small_llama(), PATTERNS, 64, torch.float32, False),
    "seq 64, tiny-qwen2 (biases)": (preset_config("tiny-qwen2"), BDLoraConfig(), 64, torch.float32, False),
    "seq 64, activation checkpointing": (small_llama(), BDLoraConfig(), 64, torch.float32, True),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_matches_one_measured_step(case):
    config, adapter, seq, dtype, checkpointing = CASES[case]
    model = meta_model(config)
    planned = memory_plan(
        model, resolve_plan(model, adapter), 1, seq_len=seq, micro_batch=2, dtype=dtype,
        activation_checkpointing=checkpointing,
    )  # fmt: skip
    measured = measure(config, adapter, seq, dtype, checkpointing)
    ratio = planned.saved_activations / measured.activations
    print(f"{case}: planned {planned.saved_activations} measured {measured.activations} ratio {ratio:.4f}")
    assert abs(ratio - 1) <= TOLERANCE
    assert (planned.base_weights, planned.adapter, planned.grads, planned.optimizer) == (
        measured.base_weights,
        measured.adapter,
        measured.grads,
        measured.optimizer,
    )


# -- measured on every rank (TP 2 and 4) -------------------------------------------------------------
# 8 heads and 4 KV heads split at TP 4; a vocabulary of 1001 is padded at every TP degree > 1.
SHARDED = small_llama(vocab_size=1001, num_attention_heads=8, num_key_value_heads=4)
SHARDED_SEQ = 64  # divisible by every TP degree, as sequence parallelism needs
SHARDED_TPS = (2, 4)  # on 4 ranks: two TP groups of 2 (data parallelism off), then one of 4
SHARDED_CASES = (  # (layout title in LAYOUTS, activation checkpointing)
    *((title, False) for title in LAYOUTS),
    ("+ vocab + sequence parallel", True),
)


def measure_sharded() -> dict[int, list[Measured]]:
    """This rank's bytes in each of ``SHARDED_CASES`` at each TP degree of ``SHARDED_TPS``, each on a
    fresh BD-LoRA model with nblocks = TP. One launch serves every degree: spawning is the slow part."""
    world = dist.get_world_size()
    return {tp: _measure_cases(build_mesh(ParallelDims(world, tp=tp))) for tp in SHARDED_TPS}


def _measure_cases(mesh: DeviceMesh) -> list[Measured]:
    tp = mesh["tp"].size()
    measured = []
    for title, checkpointing in SHARDED_CASES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(SHARDED).train()
        apply_bdlora(model, BDLoraConfig(nblocks=tp))
        layout = LAYOUTS[title]
        parallelize(
            model, mesh, vocab_parallel=layout.vocab_parallel, sequence_parallel=layout.sequence_parallel,
            activation_checkpointing=checkpointing, data_parallel=False,
        )  # fmt: skip
        measured.append(measure_step(model, SHARDED.vocab_size, SHARDED_SEQ))
    return measured


def sharded_plans(tp: int) -> list[MemoryPlan]:
    model = meta_model(SHARDED)
    plan = resolve_plan(model, BDLoraConfig(nblocks=tp))
    return [
        memory_plan(
            model,
            plan,
            tp,
            seq_len=SHARDED_SEQ,
            micro_batch=2,
            dtype=torch.float32,
            activation_checkpointing=checkpointing,
            vocab_parallel=LAYOUTS[title].vocab_parallel,
            sequence_parallel=LAYOUTS[title].sequence_parallel,
        )
        for title, checkpointing in SHARDED_CASES
    ]


@pytest.mark.slow
def test_plan_matches_every_rank_of_a_sharded_step():
    results = run_distributed(measure_sharded, 4)
    for tp in SHARDED_TPS:
        plans = sharded_plans(tp)
        for rank, by_tp in enumerate(results):
            for (title, ckpt), planned, got in zip(SHARDED_CASES, plans, by_tp[tp], strict=True):
                where = f"tp {tp} rank {rank} {title}{', checkpointing' if ckpt else ''}"
                ratio = planned.saved_activations / got.activations
                print(f"{where}: planned {planned.saved_activations} measured {got.activations} {ratio:.4f}")
                assert abs(ratio - 1) <= TOLERANCE, where
                assert (planned.base_weights, planned.adapter, planned.grads, planned.optimizer) == (
                    got.base_weights,
                    got.adapter,
                    got.grads,
                    got.optimizer,
                ), where


# -- the adapter sharding (``sharding=``, ``bdlora plan --memory --sharding``) ------------------------
def tiny_llama_factors(tp: int) -> dict[str, int]:
    """Dense LoRA rank 8 on tiny-llama (hidden 64, intermediate 128, 2 layers), counted by hand per
    rank: column layers q, k, v (64 -> 64), gate, up (64 -> 128); row layers o (64 -> 64), down
    (128 -> 64). ``replicated``: column A (r, d_in) whole, B (d_out/t, r); row A (r, d_in/t), B
    (d_out, r) whole. ``slora``: column A (r/t, d_in), B (d_out/t, r); row as replicated."""
    r, layers = 8, 2
    column, row = [(64, 64)] * 3 + [(64, 128)] * 2, [(64, 64), (128, 64)]  # (d_in, d_out)
    whole = layers * (sum(r * d_in for d_in, _ in column) + sum(d_out * r for _, d_out in row))
    row_a = layers * sum(r * d_in // tp for d_in, _ in row)
    column_b = layers * sum(d_out // tp * r for _, d_out in column)
    column_a_split = layers * sum(r // tp * d_in for d_in, _ in column)
    row_b = layers * sum(d_out * r for _, d_out in row)
    return {
        "replicated": whole + row_a + column_b,
        "replicated whole": whole,
        "slora": column_a_split + column_b + row_a + row_b,
    }


def test_dense_shardings_hold_their_factors_per_rank_by_a_hand_count():
    from bdlora.memory import adapter_params_per_rank, tp_grad_sum_params

    model = build_model("tiny-llama", device="meta")
    plan = resolve_plan(model, BDLoraConfig(nblocks=2))  # rank 8; slora and replicated make it dense
    hand = tiny_llama_factors(2)
    assert (hand["replicated"], hand["replicated whole"], hand["slora"]) == (12_288, 7_168, 9_728)
    options = dict(seq_len=64, micro_batch=1, dtype="float32")
    tensors = 2 * 7 * 2  # A and B of 7 modules in 2 layers, one fp32 step count each
    for sharding in ("slora", "replicated"):
        assert adapter_params_per_rank(plan, 2, sharding) == hand[sharding]
        p = memory_plan(model, plan, 2, sharding=sharding, **options)
        assert p.adapter == p.grads == 4 * hand[sharding]
        assert p.optimizer == 2 * 4 * hand[sharding] + 4 * tensors
    assert tp_grad_sum_params(plan, 2, "replicated") == hand["replicated whole"]
    assert tp_grad_sum_params(plan, 2, "slora") == tp_grad_sum_params(plan, 2, "bdlora") == 0
    assert adapter_params_per_rank(plan, 2) == plan.params // 2  # bdlora: everything split
    # every dense rank holds the whole rank-8 h = A x, a BD-LoRA rank its r/t columns
    bd, dense = (
        {t.name: t for t in memory_plan(model, plan, 2, sharding=s, **options).activations}
        for s in ("bdlora", "replicated")
    )
    assert bd["q_proj adapter h = A x"].shape == (64, 4) and dense["q_proj adapter h = A x"].shape == (64, 8)


def test_replicated_holds_per_rank_what_bdlora_holds_in_all(llama_8b):
    """At nblocks = t, a replicated rank holds (and so computes) the whole BD-LoRA adapter of the
    same rank: t times a BD-LoRA rank's share."""
    from bdlora.memory import adapter_flops_per_token, adapter_params_per_rank

    plan = resolve_plan(llama_8b, BDLoraConfig(rank=16, nblocks=8))
    replicated = adapter_params_per_rank(plan, 8, "replicated")
    assert replicated == plan.params == 8 * adapter_params_per_rank(plan, 8)
    base, adapter = adapter_flops_per_token(plan, 8, "replicated")
    assert (
        adapter == 6 * replicated
        and base == 4 * 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) // 8
    )


def test_dense_shardings_refuse_sequence_parallelism_and_expert_adapters():
    model = meta_model(small_llama())
    plan = resolve_plan(model, BDLoraConfig())
    options = dict(seq_len=64, micro_batch=1, dtype="float32", vocab_parallel=True)
    with pytest.raises(BDLoraConfigError, match="sequence_parallel=True supports sharding='bdlora'"):
        memory_plan(model, plan, 2, sequence_parallel=True, sharding="replicated", **options)
    assert list(
        memory_plans(model, plan, 2, sharding="slora", seq_len=64, micro_batch=1, dtype="float32")
    ) == [
        "replicated",
        "+ vocab parallel",
    ]
    with pytest.raises(BDLoraConfigError, match="unknown sharding 'dense'"):
        memory_plan(model, plan, 2, sharding="dense", **options)


def test_cli_memory_sharding_prints_the_style_and_its_gradient_sum(capsys):
    argv = ["plan", "--model", "tiny-llama", "--tp", "2", "--memory", "--seq-len", "64", "--dtype", "float32"]
    hand = tiny_llama_factors(2)
    for sharding, per_rank in (
        ("bdlora", 6_144),
        ("slora", hand["slora"]),
        ("replicated", hand["replicated"]),
    ):
        assert cli_main([*argv, "--sharding", sharding]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"tiny-llama: 14 adapted modules, {per_rank:,} adapter params/rank\n"), out
        assert f"AdamW, {sharding} adapter sharding" in out
        assert re.search(rf"^adapter +{per_rank * 4 / 1024:.2f} KiB ", out, re.M), out
    assert "backward adds one all-reduce over TP of 7,168 whole-factor gradients (28.00 KiB per step)" in out
    assert "+ vocab + sequence parallel: left out, sequence parallelism supports sharding='bdlora'" in out
    assert cli_main([*argv]) == 0  # the default is bdlora
    assert "AdamW, bdlora adapter sharding" in capsys.readouterr().out
    assert cli_main(["plan", "--model", "tiny-llama", "--sharding", "replicated"]) == 2
    assert "--sharding: these options plan memory; add --memory" in capsys.readouterr().err


DENSE_SHARDINGS = ("slora", "replicated")
DENSE_LAYOUTS = ("replicated", "+ vocab parallel")  # the dense shardings refuse sequence parallelism
DENSE_SEQ = 32


def measure_dense_shardings() -> dict[str, list[tuple[int, Measured]]]:
    """On this rank of 2: tiny-llama under each dense sharding and layout, its adapter's local
    elements and one measured training step."""
    from bdlora.presets import build_model as build

    mesh = build_mesh(ParallelDims(dist.get_world_size(), tp=2))
    out = {}
    for sharding in DENSE_SHARDINGS:
        out[sharding] = []
        for title in DENSE_LAYOUTS:
            model = build("tiny-llama").train()
            parallelize(model, mesh, sharding=sharding, vocab_parallel=LAYOUTS[title].vocab_parallel)
            apply_bdlora(model, BDLoraConfig(nblocks=2))  # dense (nblocks 1) under these shardings
            local = sum(p.numel() for p in adapter_parameters(model))
            out[sharding].append((local, measure_step(model, 256, DENSE_SEQ)))
    return out


@pytest.mark.slow
def test_dense_shardings_plan_matches_every_rank_of_a_sharded_step():
    from bdlora.memory import adapter_params_per_rank

    results = run_distributed(measure_dense_shardings, 2)
    model = build_model("tiny-llama", device="meta")
    plan = resolve_plan(model, BDLoraConfig(nblocks=2))
    for sharding in DENSE_SHARDINGS:
        for i, title in enumerate(DENSE_LAYOUTS):
            planned = memory_plan(
                model, plan, 2, seq_len=DENSE_SEQ, micro_batch=2, dtype="float32", sharding=sharding,
                vocab_parallel=LAYOUTS[title].vocab_parallel,
            )  # fmt: skip
            for rank, by_sharding in enumerate(results):
                local, got = by_sharding[sharding][i]
                where = f"{sharding} {title} rank {rank}"
                assert local == adapter_params_per_rank(plan, 2, sharding) == tiny_llama_factors(2)[sharding]
                assert (planned.base_weights, planned.adapter, planned.grads, planned.optimizer) == (
                    got.base_weights,
                    got.adapter,
                    got.grads,
                    got.optimizer,
                ), where
                # to the byte: a BD-LoRA-sized h (r/t columns) would be 14,336 B, 3.3%, short
                assert planned.saved_activations == got.activations, where
