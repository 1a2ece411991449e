"""Vocabulary and sequence parallelism at TP 2 and 4 against a single-process reference (tier 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bdlora import BDLoraConfig, apply_bdlora, parallelize, save_adapter
from bdlora.config import BDLoraConfigError
from bdlora.model import disable_adapters
from bdlora.parallel import ParallelDims, build_mesh
from bdlora.parallel.accounting import CommCounter
from bdlora.presets import preset_config
from tests.conftest import randomize_lora_b
from tests.distributed import run_distributed
from tests.test_tp import gathered_grads

pytestmark = pytest.mark.slow

LAYOUTS = {"vocab": dict(vocab_parallel=True), "sequence": dict(vocab_parallel=True, sequence_parallel=True)}
# recomputation re-enters the first layer's sequence split and every block's gather in backward
CHECKPOINTED = {"sequence-checkpointed": dict(**LAYOUTS["sequence"], activation_checkpointing=True)}
# tiny-llama (untied, vocab 256) and a tied model whose vocabulary 250 no TP degree > 1 here divides
MODELS = {"untied": dict(), "tied-odd-vocab": dict(vocab_size=250, tie_word_embeddings=True)}
BATCH, SEQ = 4, 16


def plain_model(kind: str):
    """The seeded base model, without an adapter."""
    config = preset_config("tiny-llama")
    for key, value in MODELS[kind].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def reference_model(kind: str):
    model = plain_model(kind).train()
    torch.manual_seed(0)
    apply_bdlora(model, BDLoraConfig(rank=8, alpha=16, nblocks=4, patterns={"up_proj": {"rank": 12}}))
    randomize_lora_b(model)
    return model


def batch(kind: str, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = MODELS[kind].get("vocab_size", 256)
    ids = torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens: no loss
    return ids, labels


def step(model, ids, labels) -> dict:
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return {"loss": out.loss.detach(), "logits_width": out.logits.shape[-1]}


def reference_results(kind: str) -> dict:
    model = reference_model(kind)
    ids, labels = batch(kind)
    res = step(model, ids, labels)
    res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        res["logits"] = model(input_ids=ids).logits
        res["odd_logits"] = model(input_ids=batch(kind, SEQ - 1)[0]).logits
    res["generated"] = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    return res


def sharded_results(kind: str, layout: str, out_dir: str) -> dict:
    tp = dist.get_world_size()
    layouts = {**LAYOUTS, **CHECKPOINTED}
    model = parallelize(reference_model(kind), build_mesh(ParallelDims(tp, tp=tp)), **layouts[layout])
    ids, labels = batch(kind)
    res = step(model, ids, labels)
    res["grads"] = gathered_grads(model)
    res["embedding_rows"] = model.get_input_embeddings().weight.shape[0]
    res["tied"] = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    model.eval()
    with torch.no_grad():
        res["logits"] = model(input_ids=ids).logits
        res["odd_logits"] = model(input_ids=batch(kind, SEQ - 1)[0]).logits
    res["generated"] = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    save_adapter(model, out_dir)  # every rank gathers its factor shards; rank 0 writes
    return res


def all_sharded(out_dir: str) -> dict:
    return {
        (kind, layout): sharded_results(kind, layout, f"{out_dir}/{kind}-{layout}")
        for kind in MODELS
        for layout in (*LAYOUTS, *CHECKPOINTED)
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_and_sequence_parallel_match_single_process(tmp_path, tp):
    references = {kind: reference_results(kind) for kind in MODELS}
    for rank, results in enumerate(run_distributed(all_sharded, tp, str(tmp_path))):
        for (kind, layout), res in results.items():
            ref, where = references[kind], f"rank {rank} {kind} {layout}"
            vocab = MODELS[kind].get("vocab_size", 256)
            assert res["embedding_rows"] == math.ceil(vocab / tp), where
            assert res["tied"] == (kind == "tied-odd-vocab"), where
            assert res["logits_width"] == math.ceil(vocab / tp), f"{where}: full logits in training"
            torch.testing.assert_close(res["loss"], ref["loss"], atol=1e-5, rtol=1e-5, msg=where)
            torch.testing.assert_close(res["logits"], ref["logits"], atol=1e-5, rtol=1e-5, msg=where)
            torch.testing.assert_close(res["odd_logits"], ref["odd_logits"], atol=1e-5, rtol=1e-5, msg=where)
            assert torch.equal(res["generated"], ref["generated"]), where
            assert res["grads"].keys() == ref["grads"].keys(), where
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(
                    res["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=f"{where} {name}"
                )
    for kind in MODELS:  # the adapters rank 0 saved are the reference's (nothing was trained)
        saved = {k: v for k, v in _read_adapter(tmp_path / f"{kind}-sequence").items()}
        expected = _read_adapter_of(reference_model(kind), tmp_path / f"{kind}-reference")
        assert saved.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(saved[name], value, atol=0, rtol=0, msg=name)
        # and PEFT itself loads it onto the plain model, giving the reference's logits
        peft_model = PeftModel.from_pretrained(plain_model(kind), str(tmp_path / f"{kind}-sequence")).eval()
        with torch.no_grad():
            peft_logits = peft_model(input_ids=batch(kind)[0]).logits
        torch.testing.assert_close(peft_logits, references[kind]["logits"], atol=1e-5, rtol=1e-5)


def _read_adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _read_adapter_of(model, path) -> dict[str, torch.Tensor]:
    save_adapter(model, str(path))
    return _read_adapter(path)


def count_collectives(layout: str) -> dict:
    """One training step's TP collectives with and without the adapter's contribution."""
    tp = dist.get_world_size()
    model = parallelize(reference_model("untied"), build_mesh(ParallelDims(tp, tp=tp)), **LAYOUTS[layout])
    model.get_input_embeddings().weight.requires_grad_(True)  # the same backward graph in both runs
    ids, labels = batch("untied")
    counts = {"adapter": _counted_step(model, ids, labels)}
    with disable_adapters(model):  # entering it is a collective of its own: outside the counter
        counts["base"] = _counted_step(model, ids, labels)
    return counts


def _counted_step(model, ids, labels) -> dict:
    with CommCounter({"tp": dist.group.WORLD}) as comm:
        loss = model(input_ids=ids, labels=labels).loss
        forward = comm.summary()["tp"]
        loss.backward()
    total = comm.summary()["tp"]
    return {
        "forward": forward["ops"],
        "backward": {op: total["ops"][op] - forward["ops"].get(op, 0) for op in total["ops"]},
        "bytes": total["bytes"],
    }


def both_layouts() -> dict:
    return {layout: count_collectives(layout) for layout in LAYOUTS}


def test_collectives_are_megatrons_and_adapters_add_none():
    counts = run_distributed(both_layouts, 2)[0]
    blocks = 2 * preset_config("tiny-llama").num_hidden_layers  # attention and MLP per layer
    for layout, modes in counts.items():
        assert modes["adapter"] == modes["base"], f"{layout}: the adapter changed the collectives"
    vocab = counts["vocab"]["adapter"]
    # forward: g per block, the embedding's all-reduce, the loss's max and (sum-exp, target) reductions
    assert vocab["forward"] == {"all_reduce": blocks + 1 + 2}
    # backward: f per block and the LM head's f; the loss needs none
    assert {k: v for k, v in vocab["backward"].items() if v} == {"all_reduce": blocks + 1}
    seq = counts["sequence"]["adapter"]
    # forward: per block an all-gather (f) and a reduce-scatter (g); the entry's reduce-scatter,
    # the exit's all-gather before the LM head, and the loss's two all-reduces
    assert seq["forward"] == {"all_gather": blocks + 1, "reduce_scatter": blocks + 1, "all_reduce": 2}
    assert {k: v for k, v in seq["backward"].items() if v} == {
        "all_gather": blocks + 1,
        "reduce_scatter": blocks + 1,
    }


def sequence_errors() -> list[str]:
    mesh = build_mesh(ParallelDims(2, tp=2))
    messages = []
    try:
        parallelize(reference_model("untied"), mesh, sequence_parallel=True)
    except ValueError as err:
        messages.append(str(err))
    model = parallelize(reference_model("untied"), mesh, **LAYOUTS["sequence"])
    ids, labels = batch("untied", SEQ - 1)
    try:
        model(input_ids=ids, labels=labels)
    except BDLoraConfigError as err:
        messages.append(str(err))
    return messages


def test_sequence_parallel_errors_name_the_fix():
    needs_vocab, odd_length = run_distributed(sequence_errors, 2)[0]
    assert "needs vocab_parallel=True" in needs_vocab
    assert "sequence length 15 is not divisible by the TP degree 2" in odd_length
