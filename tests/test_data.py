"""The data pipeline: loading, packing, prompt masking, eval split, DP sharding, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bdlora.data import TASKS, embedded_pairs, format_pair
from bdlora.presets import preset_config
from bdlora.train.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataConfig,
    DataError,
    EvalLoader,
    HFTokenizer,
    PackedBlocks,
    PackedLoader,
    build_loaders,
    build_tokenizer,
    byte_batches,
    check_seq_len,
    check_vocab,
    load_examples,
    pack_examples,
    split_examples,
)

BYTES = ByteTokenizer()
EXAMPLES = [format_pair("add 1 2", "3"), ("", "plain text, all trained"), format_pair("upper ab", "AB")]


def numbered_blocks(n: int, seq_len: int = 4) -> PackedBlocks:
    """Block i is filled with i, so a batch's first column names the blocks it holds."""
    ids = torch.arange(n).unsqueeze(1).expand(n, seq_len).clone()  # (N, T)
    return PackedBlocks(ids, ids.clone())


def block_ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].tolist()


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- embedded dataset ---------------------------------------------------------------------------


def _expected_answer(prompt: str) -> str:
    task, *args = prompt.split()
    if task == "count":
        return str(args[2].count(args[0]))
    if task == "add":
        return str(int(args[0]) + int(args[1]))
    if task == "even":
        return "yes" if int(args[0]) % 2 == 0 else "no"
    word = args[0]
    return {"copy": word, "reverse": word[::-1], "upper": word.upper(), "sort": "".join(sorted(word))}.get(
        task, word[0]
    )


def test_embedded_pairs_are_correct_distinct_deterministic_and_prefix_stable():
    pairs = embedded_pairs(500, seed=3)
    assert all(response == _expected_answer(prompt) for prompt, response in pairs)
    assert len(set(pairs)) == 500
    assert {p.split()[0] for p, _ in pairs} == set(TASKS)
    assert pairs == embedded_pairs(500, seed=3)
    assert embedded_pairs(100, seed=3) == pairs[:100]
    assert embedded_pairs(100, seed=4) != pairs[:100]


def test_byte_batches_feed_the_demo():
    batches = byte_batches(embedded_pairs(200), batch_size=4, seq_len=32, seed=1)
    x, y = next(batches)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    again = next(byte_batches(embedded_pairs(200), batch_size=4, seq_len=32, seed=1))
    torch.testing.assert_close(x, again[0])


# --- tokenisers ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8_and_uses_byte_0_as_eos():
    tok = build_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and isinstance(build_tokenizer("bytes"), ByteTokenizer)
    text = "Q: naïve → ok\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 0 and 0 not in tok.encode(text)


def _save_word_tokenizer(path: Path, eos: str | None = "<eos>") -> Path:
    """A word-level HF tokenizer that prepends BOS, built offline and saved like a hub one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "Q": 3, ":": 4, "A": 5, "hello": 6, "world": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    specials = {"unk_token": "<unk>", "bos_token": "<bos>"} | ({"eos_token": eos} if eos else {})
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(path)
    return path


def test_hf_tokenizer_from_local_dir_adds_no_special_tokens(tmp_path):
    tok = build_tokenizer(str(_save_word_tokenizer(tmp_path)))
    assert isinstance(tok, HFTokenizer)
    assert tok.tokenizer.encode("hello world") == [1, 6, 7]  # the raw tokenizer would add BOS
    assert tok.encode("hello world") == [6, 7]
    blocks = pack_examples([("hello", "world"), ("", "hello")], tok, seq_len=5)
    assert blocks.input_ids.tolist() == [[6, 7, 2, 6, 2]]
    assert blocks.labels.tolist() == [[IGNORE_INDEX, 7, 2, 6, 2]]


def test_hf_tokenizer_without_eos_is_refused(tmp_path):
    with pytest.raises(DataError, match="has no eos token"):
        build_tokenizer(str(_save_word_tokenizer(tmp_path, eos=None)))


def test_build_tokenizer_passes_gguf_file_through(monkeypatch):
    import transformers  # noqa: PLC0415

    calls = []

    class FakeTokenizer:
        eos_token_id = 5

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return FakeTokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    assert build_tokenizer("some/repo", gguf_file="model.Q4.gguf").eos_token_id == 5
    build_tokenizer("some/repo")
    assert calls == [("some/repo", {"gguf_file": "model.Q4.gguf"}), ("some/repo", {})]
    with pytest.raises(DataError, match=r"gguf_file='model.Q4.gguf' needs a tokenizer"):
        build_tokenizer(None, gguf_file="model.Q4.gguf")


# --- packing and masking ------------------------------------------------------------------------


def _stream(examples):
    return [b for prompt, completion in examples for b in [*BYTES.encode(prompt + completion), 0]]


def test_packing_round_trips_tokens_with_eos_separators():
    stream = _stream(EXAMPLES)
    padded = pack_examples(EXAMPLES, BYTES, seq_len=16, pad_last=True)
    flat = padded.input_ids.flatten().tolist()
    assert flat[: len(stream)] == stream and set(flat[len(stream) :]) <= {0}
    pieces = bytes(flat).split(b"\x00")
    assert [p.decode() for p in pieces[: len(EXAMPLES)]] == [p + c for p, c in EXAMPLES]

    dropped = pack_examples(EXAMPLES, BYTES, seq_len=16)
    assert dropped.input_ids.shape == (len(stream) // 16, 16)
    assert dropped.input_ids.flatten().tolist() == stream[: len(dropped) * 16]


def test_labels_are_ignore_exactly_on_prompt_tokens_and_padding():
    blocks = pack_examples(EXAMPLES, BYTES, seq_len=16, pad_last=True)
    is_prompt = [m for p, c in EXAMPLES for m in [True] * len(p.encode()) + [False] * (len(c.encode()) + 1)]
    is_prompt += [True] * (blocks.input_ids.numel() - len(is_prompt))  # padding
    expected = torch.where(torch.tensor(is_prompt), IGNORE_INDEX, blocks.input_ids.flatten())
    assert blocks.labels.flatten().tolist() == expected.tolist()
    assert blocks.labels.dtype == torch.long


# --- eval split ---------------------------------------------------------------------------------


def test_eval_split_is_disjoint_covering_and_deterministic_by_seed():
    examples = [("", f"doc {i}") for i in range(200)]
    train, evals = split_examples(examples, 0.1, seed=7)
    assert len(evals) == 20 and not set(train) & set(evals)
    assert sorted(train + evals) == sorted(examples)
    assert train == [ex for ex in examples if ex in set(train)]  # file order kept
    assert split_examples(examples, 0.1, seed=7) == (train, evals)
    assert split_examples(examples, 0.1, seed=8)[1] != evals
    assert split_examples(examples, 0.0, seed=7) == (examples, [])


# --- DP sharding and resume ---------------------------------------------------------------------


def test_same_dp_rank_gets_same_batches_and_dp_ranks_are_disjoint_covering():
    blocks = numbered_blocks(24)
    rank0, tp_peer0, rank1 = (PackedLoader(blocks, 3, r, 2, seed=5) for r in (0, 0, 1))
    assert rank0.steps_per_epoch == 4
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(4):
            b0, b0_peer, b1 = next(rank0), next(tp_peer0), next(rank1)
            torch.testing.assert_close(b0, b0_peer)
            assert not set(block_ids(b0)) & set(block_ids(b1))
            seen += block_ids(b0) + block_ids(b1)
        assert sorted(seen) == list(range(24))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert rank0.epoch == 1 and rank0.position == 24


def test_epoch_tail_short_of_a_global_batch_is_left_out_in_lockstep():
    loaders = [PackedLoader(numbered_blocks(25), 3, r, 2, seed=0) for r in (0, 1)]
    first_epoch = [i for _ in range(4) for loader in loaders for i in block_ids(next(loader))]
    assert len(set(first_epoch)) == 24
    next(loaders[0])
    assert loaders[0].epoch == 1


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_resume_from_state_dict_continues_with_exactly_the_next_batches(dp_rank):
    blocks = pack_examples([format_pair(p, r) for p, r in embedded_pairs(300)], BYTES, seq_len=32)
    uninterrupted = PackedLoader(blocks, 4, dp_rank, 2, seed=1)
    for _ in range(uninterrupted.steps_per_epoch - 2):  # resume just before an epoch boundary
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    resumed = PackedLoader(blocks, 4, dp_rank, 2, seed=1)
    resumed.load_state_dict(state)
    for _ in range(5):
        torch.testing.assert_close(next(resumed), next(uninterrupted))
    assert resumed.epoch == 1


def test_resume_on_another_dp_size_continues_from_the_same_block():
    blocks = numbered_blocks(40)
    single = PackedLoader(blocks, 4, seed=2)
    next(single), next(single)
    pair = [PackedLoader(blocks, 2, r, 2, seed=2) for r in (0, 1)]
    for loader in pair:
        loader.load_state_dict(single.state_dict())
    assert block_ids(next(pair[0])) + block_ids(next(pair[1])) == block_ids(next(single))


def test_resume_refuses_state_from_other_data():
    state = PackedLoader(numbered_blocks(24), 2, seed=0).state_dict()
    with pytest.raises(DataError, match="saved with num_blocks=24 but this loader has num_blocks=30"):
        PackedLoader(numbered_blocks(30), 2, seed=0).load_state_dict(state)


def test_eval_loader_covers_every_block_once_at_any_dp_degree():
    blocks = numbered_blocks(11)
    ranks = [EvalLoader(blocks, 2, r, 3) for r in range(3)]
    batches = [list(loader) for loader in ranks]
    assert [len(b) for b in batches] == [len(loader) for loader in ranks] == [2, 2, 2]
    ids = [[i for batch in rank for i in block_ids(batch)] for rank in batches]
    assert ids == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]  # strided: every block, once
    assert [block_ids(b) for b in ranks[0]] == [block_ids(b) for b in batches[0]]  # re-iterable
    first = [EvalLoader(blocks, 2, r, 2, max_blocks=5) for r in range(2)]
    assert sorted(i for loader in first for b in loader for i in block_ids(b)) == [0, 1, 2, 3, 4]
    assert list(EvalLoader(numbered_blocks(1), 2, dp_rank=1, dp_size=2)) == []  # a rank with no block


# --- end to end ---------------------------------------------------------------------------------


def test_build_loaders_on_embedded_data_yields_long_batches_of_the_configured_shape():
    cfg = DataConfig(num_examples=400, seq_len=32, micro_batch_size=4, eval_fraction=0.1)
    train, evals = build_loaders(cfg, BYTES, dp_rank=1, dp_size=2, model_config=preset_config("tiny-llama"))
    x, y = next(train)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert evals is not None and all(b[0].shape[1] == 32 for b in evals)
    assert build_loaders(DataConfig(num_examples=400, eval_fraction=0.0), BYTES)[1] is None


# --- local files --------------------------------------------------------------------------------


def test_jsonl_loads_text_pairs_alpaca_and_custom_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "a document"},
            {"prompt": "p", "response": "r"},
            {"instruction": "do", "input": "this", "output": "done"},
            {"instruction": "do", "output": "done"},
        ],
    )
    (tmp_path / "mixed.jsonl").write_text(path.read_text() + "\n")  # a trailing blank line is skipped
    assert load_examples(DataConfig(source=str(path))) == [
        ("", "a document"),
        format_pair("p", "r"),
        format_pair("do\nthis", "done"),
        format_pair("do", "done"),
    ]
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "2+2", "a": "4"}, {"body": "text"}])
    cfg = DataConfig(source=str(custom), prompt_field="q", response_field="a", text_field="body")
    assert load_examples(cfg) == [format_pair("2+2", "4"), ("", "text")]
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_examples(DataConfig(source=str(raw))) == [("", "a\u2028b")]


def test_txt_paragraphs_and_directories_load_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("first para\nline two\n\n  \nsecond para\n")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "notes.md").write_text("not data")
    assert load_examples(DataConfig(source=str(tmp_path / "b.txt"))) == [
        ("", "first para\nline two"),
        ("", "second para"),
    ]
    assert [t for _, t in load_examples(DataConfig(source=str(tmp_path)))] == [
        "from jsonl",
        "first para\nline two",
        "second para",
    ]


@pytest.fixture
def hf_datasets(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def test_hf_datasets_load_local_json_and_csv(hf_datasets, tmp_path):
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    native = load_examples(DataConfig(source=str(path)))
    assert load_examples(DataConfig(source=str(path), hf_format="json")) == native
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,response\n" + "".join(f"p{i},r{i}\n" for i in range(3)))
    assert load_examples(DataConfig(source=str(csv), hf_format="csv")) == native


def test_hf_row_without_the_fields_names_the_row(hf_datasets, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"bad.csv row 0: fields found \['answer', 'question'\]"):
        load_examples(DataConfig(source=str(csv), hf_format="csv"))


# --- errors, before any training ----------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"'{missing}': no such file or directory"):
        load_examples(DataConfig(source=str(missing)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_examples(DataConfig(source=str(missing), hf_format="json"))


def test_unknown_extension_lists_the_valid_ones(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    with pytest.raises(
        DataError, match=r"unknown file extension '.json'; valid: .jsonl, .txt, or set data.hf_format"
    ):
        load_examples(DataConfig(source=str(path)))


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3: not valid JSON"):
        load_examples(DataConfig(source=str(path)))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"question": "q", "prompt": "p"}, r"line 1: fields found \['prompt', 'question'\]; expected 'text'"),
        (["not", "an", "object"], "line 1: expected a JSON object, got list"),
        ({"text": 3}, "line 1: field 'text' must be a string, got int"),
    ],
)
def test_jsonl_record_without_usable_fields_names_line_and_fields(tmp_path, record, match):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=match):
        load_examples(DataConfig(source=str(path)))


def test_empty_source_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(DataConfig(source=str(tmp_path / "empty.txt")))


def test_dataset_smaller_than_one_global_batch_says_how_many_blocks():
    cfg = DataConfig(num_examples=20, seq_len=128, micro_batch_size=8, eval_fraction=0.0)
    n_blocks = len(pack_examples(load_examples(cfg), BYTES, cfg.seq_len))
    with pytest.raises(DataError, match=rf"packs into {n_blocks} blocks of seq_len=128; .* = 8 \* 2 = 16"):
        build_loaders(cfg, BYTES, dp_rank=0, dp_size=2)


def test_seq_len_over_max_position_embeddings_is_refused_before_loading():
    config = preset_config("tiny-llama")
    check_seq_len(256, config)
    with pytest.raises(DataError, match=r"seq_len=512 exceeds the model's max_position_embeddings=256"):
        check_seq_len(512, config)
    with pytest.raises(DataError, match="max_position_embeddings"):  # not the missing file
        build_loaders(DataConfig(source="/no/such/file.jsonl", seq_len=512), BYTES, model_config=config)


def test_token_ids_outside_the_model_vocab_are_refused():
    config = preset_config("tiny-llama")
    check_vocab(numbered_blocks(256), config)
    with pytest.raises(DataError, match=r"token id 256 is outside the model's vocab_size=256"):
        check_vocab(numbered_blocks(257), config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eval_fraction": 1.0}, r"eval_fraction must lie in \[0, 1\), got 1.0"),
        ({"eval_fraction": -0.1}, r"eval_fraction must lie in \[0, 1\), got -0.1"),
        ({"seq_len": 1}, "seq_len must be >= 2, got 1"),
        ({"micro_batch_size": 0}, "micro_batch_size must be >= 1, got 0"),
        ({"hf_format": "xml"}, "hf_format 'xml' is unknown; valid: json, csv"),
    ],
)
def test_config_values_out_of_range_are_refused(kwargs, match):
    with pytest.raises(DataError, match=match):
        DataConfig(**kwargs)


def test_split_and_dp_values_that_cannot_work_are_refused():
    with pytest.raises(DataError, match="2 examples leave none for training after holding out 2"):
        split_examples([("", "a"), ("", "b")], 0.9, seed=0)
    with pytest.raises(DataError, match="dp_rank=2, dp_size=2"):
        PackedLoader(numbered_blocks(8), 2, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match="dp_rank=3, dp_size=2"):
        EvalLoader(numbered_blocks(4), 2, dp_rank=3, dp_size=2)
