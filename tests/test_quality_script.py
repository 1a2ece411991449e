"""scripts/quality.py, the quality table's runner, on a tiny Llama with a character tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from bdlora.presets import llama_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "quality.py"
CHARS = list("0123456789+=")
# the tiny model's projections, (d_in, d_out); BD-LoRA's block factor: B in column, A in row layers
SHAPES = {"q": (48, 48), "k": (48, 48), "v": (48, 48), "o": (48, 48), "gate": (48, 96), "up": (48, 96)}
SHAPES["down"] = (96, 48)
COLUMN = {"q", "k", "v", "gate", "up"}
ATTN = {"q", "k", "v", "o"}


def bd_params(rank_of) -> int:
    """BD-LoRA parameters at nblocks 3 from the shapes, ``rank_of(module, layer)`` per module."""
    total = 0
    for layer in (0, 1):
        for name, (d_in, d_out) in SHAPES.items():
            r = rank_of(name, layer)
            total += r * d_in + d_out * r // 3 if name in COLUMN else r * d_in // 3 + r * d_out
    return total


def load_script():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # as when run: its sibling modules import
    spec = importlib.util.spec_from_file_location("quality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quality = load_script()


def character_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-adder")
    torch.manual_seed(0)
    config = llama_config(48, 96, 2, 3, 16, 64)  # 2 layers, 3 heads: TP 3 and nblocks 3 divide it
    LlamaForCausalLM(config).save_pretrained(out)
    character_tokenizer().save_pretrained(out)
    return out


def test_training_batches_never_contain_a_held_out_question():
    held_out = set(quality.eval_set(5000))  # ~20 collisions expected in 3,200 draws without the filter
    batches = quality.train_batches(seed=0, batch=16, held_out=held_out)
    drawn = [q for _ in range(200) for q in next(batches)]
    assert len(drawn) == 3200
    assert not held_out & set(drawn)
    assert quality.eval_set(200) == quality.eval_set(200)  # every seed scores the same questions


def test_the_loss_covers_the_answer_and_its_end_token_only(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    items = [(123, 456), (999, 999)]  # answers of 3 and 4 digits: left padding differs per row
    loss = quality.train_loss(model, tokenizer, items)
    # reference: full-sequence logits, loss on the answer digits and </s> of each row
    ids, mask = quality.encode(tokenizer, [f"{a}+{b}={a + b}</s>" for a, b in items])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    losses = []
    for row, (a, b) in enumerate(items):
        n = len(str(a + b)) + 1
        losses.append(
            torch.nn.functional.cross_entropy(logits[row, -n - 1 : -1], ids[row, -n:], reduction="sum")
        )
    expected = torch.stack(losses).sum() / sum(len(str(a + b)) + 1 for a, b in items)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_exact_greedy_answers(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    questions = [(100, 200), (321, 456)]

    class Oracle(torch.nn.Module):
        """Emits the right answer for the first question only, then </s>."""

        training = False

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
            written = input_ids.shape[1] - len("100+200=")  # tokens generated so far
            token = "300"[written] if written < 3 else "</s>"
            logits = torch.full((input_ids.shape[0], 1, len(CHARS) + 2), -1.0)
            logits[:, 0, tokenizer.convert_tokens_to_ids(token)] = 1.0
            return type("Out", (), {"logits": logits})()

    assert quality.accuracy(Oracle(), tokenizer, questions) == 0.5


@pytest.mark.parametrize(
    ("method", "rank_of"),
    [
        ("bdlora", lambda name, layer: 9),
        ("bdlora_matched", lambda name, layer: 15 if name in ATTN else 12),
        ("attn_heavy", lambda name, layer: 18 if name in ATTN else 9),
        ("mlp_heavy", lambda name, layer: 9 if name in ATTN else 18),
        ("early_heavy", lambda name, layer: 18 if layer == 0 else 9),
        ("late_heavy", lambda name, layer: 9 if layer == 0 else 18),
    ],
)
def test_each_bdlora_method_gets_the_ranks_it_names(tiny_dir, method, rank_of):
    import bdlora

    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    bdlora.apply_bdlora(model, quality.bdlora_config(quality.ALL_METHODS(2)[method], nblocks=3))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == bd_params(rank_of)


@pytest.mark.slow
def test_the_whole_table_on_a_tiny_model(tiny_dir, tmp_path):
    """Every method, its parameter count, and TP 3 repeating TP 1's losses and score."""
    cmd = [
        sys.executable,
        str(SCRIPT),
        f"--model-dir={tiny_dir}",
        "--seeds",
        "0",
        "--no-sweep",
        "--steps=3",
        "--batch=4",
        "--eval=8",
        "--nblocks=3",
        "--layers=2",
        "--threads=1",
        f"--out-dir={tmp_path}",
    ]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"quality.py exited {done.returncode}:\n{done.stderr[-4000:]}"
    result = json.loads((tmp_path / "quality.json").read_text())
    runs = result["runs"]
    assert {r["method"] for r in runs} == {m.name for m in quality.MAIN}
    params = {r["method"]: r["params"] for r in runs}
    assert params["lora"] == 2 * sum(8 * (d_in + d_out) for d_in, d_out in SHAPES.values())
    assert params["bdlora"] == bd_params(lambda name, layer: 9)
    assert params["bdlora_matched"] == bd_params(lambda name, layer: 15 if name in ATTN else 12)
    check = result["tp_check"]
    assert check["tp"] == 3 and check["max_loss_diff"] < 1e-4
    assert check["accuracy_tp"] == check["accuracy_tp1"]
    table = (tmp_path / "quality.md").read_text()
    assert "| LoRA (PEFT), rank 8 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4, table  # the header, the base model and 3 methods


@pytest.mark.slow
def test_a_rerun_reuses_runs_finished_with_the_same_settings_only(tmp_path):
    args = quality.parse_args(["--model-dir=/nonexistent", "--steps=3"])
    out = tmp_path / "lora_s0_tp1.json"
    finished = {"method": "lora", "accuracy": 0.25, "train_s": 1.0, "settings": quality.settings(args)}
    out.write_text(json.dumps(finished))
    assert quality.launch(args, "lora", 0, 1, out) == finished  # nothing ran: the model dir is bogus
    changed = quality.parse_args(["--model-dir=/nonexistent", "--steps=4"])
    with pytest.raises(subprocess.CalledProcessError):  # other settings: it runs (and fails here)
        quality.launch(changed, "lora", 0, 1, out)
    report = quality.parse_args(["report", "--model-dir=/nonexistent", "--steps=4"])
    assert quality.launch(report, "lora", 0, 1, out) is None  # report runs nothing
    fresh = quality.parse_args(["--model-dir=/nonexistent", "--steps=3", "--fresh"])
    with pytest.raises(subprocess.CalledProcessError):
        quality.launch(fresh, "lora", 0, 1, out)
