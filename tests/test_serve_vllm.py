"""BD-LoRA adapters trained by bdlora, served by the real vLLM engine through bdlora's plugin.

One engine per TP degree (1, 2, 4) walks every check (``tests/vllm_engine.py``) on a tiny Llama
with adapters trained by ``bdlora-train``: two BD-LoRA (nblocks 4, so k = 4, 2, 1 blocks per rank)
and one dense. Each engine's greedy tokens and logprobs are compared with bdlora's own decoding
(what ``bdlora generate`` runs) and with PEFT's on the same adapter directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.serving import (
    PROMPTS,
    greedy_with_logprobs,
    require_serve_venv,
    run_engine,
    train,
    write_tiny_llama,
)

pytestmark = pytest.mark.slow

NBLOCKS, RANK, MAX_LORA_RANK = 4, 8, 8
ADAPTERS = {  # name -> bdlora-train overrides
    "bd_a": (f"adapter.nblocks={NBLOCKS}", "seed=1", "optim.lr=0.004", "steps=3"),
    "bd_b": (f"adapter.nblocks={NBLOCKS}", "seed=2", "optim.lr=0.006", "steps=3", "adapter.alpha=8"),
    "dense": ("adapter.nblocks=1", "seed=3", "optim.lr=0.004", "steps=3"),
}
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base model, the trained runs, and bdlora's and PEFT's greedy tokens for each adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bdlora.train.export import hf_byte_tokenizer, load_model, open_run

    require_serve_venv()
    root = tmp_path_factory.mktemp("serve")
    base = write_tiny_llama(root / "base")
    common = ("model.source=path", f"model.path={base}", f"adapter.rank={RANK}")
    runs = {name: train(root / name, *common, *extra) for name, extra in ADAPTERS.items()}
    refused = train(root / "nb2", *common, "adapter.nblocks=2", "steps=1")
    tokenizer = hf_byte_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def decode_all(model):  # every token, eos included, as the engine runs with ignore_eos
        return [greedy_with_logprobs(model, ids, eos_token_id=-1) for ids in prompts]

    bdlora_ref = {"base": decode_all(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())}
    peft_ref = {}
    for name, run in runs.items():
        bdlora_ref[name] = decode_all(load_model(open_run(run), base))
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_ref[name] = decode_all(PeftModel.from_pretrained(plain, run / "adapter").eval())
    return {
        "root": root,
        "base": base,
        "runs": runs,
        "refused": refused / "adapter",
        "prompts": prompts,
        "bdlora": bdlora_ref,
        "peft": peft_ref,
        "results": {},
    }


def engine(served, tp: int) -> dict:
    """The engine's results at ``tp``, run once per module."""
    if tp not in served["results"]:
        spec = {
            "model": str(served["base"]),
            "tp": tp,
            "max_lora_rank": MAX_LORA_RANK,
            "adapters": {name: str(run / "adapter") for name, run in served["runs"].items()},
            "prompts": served["prompts"],
            "max_tokens": 8,
            "count_steps": 4,
            "holdings_adapter": "bd_a",
            "refused_adapter": str(served["refused"]) if 2 % tp else None,
        }
        served["results"][tp] = run_engine(spec, served["root"])
    return served["results"][tp]


def assert_same(served_rows: list[dict], reference: list[dict], what: str) -> None:
    for i, (got, want) in enumerate(zip(served_rows, reference)):
        tokens, logprobs = got["tokens"], got["logprobs"]
        assert tokens == want["tokens"], f"{what}, prompt {i}: vLLM {tokens} != {want['tokens']}"
        torch.testing.assert_close(
            torch.tensor(logprobs), torch.tensor(want["logprobs"]), atol=LOGPROB_TOL, rtol=0, msg=what
        )


def test_references_are_distinct(served):
    """The adapters change the model's output, and differently: equality below means something."""
    tokens = {name: [r["tokens"] for r in rows] for name, rows in served["bdlora"].items()}
    for name in ADAPTERS:
        assert tokens[name] != tokens["base"], f"{name} does not change any greedy token"
        assert [r["tokens"] for r in served["peft"][name]] == tokens[name], (
            f"PEFT and bdlora differ on {name}"
        )
    assert len({str(t) for t in tokens.values()}) == len(tokens)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vllm_matches_bdlora_and_peft(served, tp):
    result = engine(served, tp)
    for name in ["base", *ADAPTERS]:
        assert_same(result["single"][name], served["bdlora"][name], f"TP {tp}, {name} vs bdlora")
        if name in served["peft"]:
            assert_same(result["single"][name], served["peft"][name], f"TP {tp}, {name} vs PEFT")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mixed_batch_equals_each_adapter_alone(served, tp):
    result = engine(served, tp)
    for row in result["mixed"]:
        alone = result["single"][row["adapter"]][row["prompt"]]
        assert row["tokens"] == alone["tokens"], f"TP {tp}: {row['adapter']} on prompt {row['prompt']}"
        torch.testing.assert_close(
            torch.tensor(row["logprobs"]), torch.tensor(alone["logprobs"]), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_its_shard_only(served, tp):
    """Read on the workers: BD-LoRA buffers of rank max_rank/TP, holding k = N/TP blocks."""
    holdings = engine(served, tp)["holdings"]
    assert len(holdings) == tp
    local_rank = MAX_LORA_RANK // tp
    for rank, layers in enumerate(holdings):
        assert {layer["layer"] for layer in layers} == {
            "BlockDiagonalQKVLoRA",
            "BlockDiagonalMergedColumnLoRA",
            "BlockDiagonalRowLoRA",
        }
        for layer in layers:
            assert layer["tp_rank"] == rank
            assert layer["dense_nnz"] == 0, f"{layer['module']}: a BD-LoRA adapter reached the dense buffers"
            for shape_a, shape_b, nnz_a, nnz_b in zip(
                layer["bd_a_shape"], layer["bd_b_shape"], layer["bd_a_nnz"], layer["bd_b_nnz"]
            ):
                assert shape_a[2] == shape_b[3] == local_rank
                rows_in, cols_out = shape_a[3], shape_b[2]
                if layer["layer"] == "BlockDiagonalRowLoRA":
                    # A: k blocks of (r/N, d_in/N) on (r/t, d_in/t); B: (d_out, r/t) whole
                    assert nnz_a[0] == local_rank * rows_in // (NBLOCKS // tp)
                    assert 0 < nnz_b[0] <= cols_out * local_rank
                else:
                    # A: (r/t, d_in) whole; B: k blocks of (d_out/N, r/N) on (d_out/t, r/t)
                    assert nnz_a[0] == local_rank * rows_in
                    assert 0 < nnz_b[0] <= cols_out * local_rank // (NBLOCKS // tp)
                assert sum(nnz_a[1:]) == sum(nnz_b[1:]) == 0  # one adapter loaded: one slot


@pytest.mark.parametrize("tp", [2, 4])
def test_adapters_add_no_collective(served, tp):
    """The collectives each worker issued over the same decode steps, with and without each adapter."""
    counts = engine(served, tp)["collectives"]
    assert counts["base"][0]["all_reduce"] > 0  # the counter sees the base model's own reductions
    for name in ADAPTERS:
        assert counts[name] == counts["base"], f"TP {tp}: {name} changed the collectives"


def test_refused_adapter_names_both_numbers_and_engine_serves_on(served):
    """nblocks=2 at TP 4: refused before the engine sees it; the next request is served."""
    result = engine(served, 4)["refused"]
    assert result["error"] is not None and "nblocks=2" in result["error"]
    assert "tensor-parallel degree 4" in result["error"]
    assert_same(result["after"], served["bdlora"]["bd_a"], "after the refusal")


def test_bdlora_generate_cli_gives_vllm_text(served):
    """``bdlora generate`` (the CLI users run) completes a prompt with the text vLLM served at TP 2."""
    from bdlora.train.export import hf_byte_tokenizer

    tokens = engine(served, 2)["single"]["bd_a"][0]["tokens"]
    tokens = tokens[: tokens.index(0)] if 0 in tokens else tokens  # generate stops at eos (id 0)
    cli = Path(sys.executable).with_name("bdlora")
    out = subprocess.run(
        [
            str(cli),
            "generate",
            str(served["runs"]["bd_a"]),
            "--prompt",
            PROMPTS[0],
            "--raw",
            "--max-new-tokens",
            "8",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.rstrip("\n") == hf_byte_tokenizer().decode(tokens).rstrip("\n")


def ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def server_wait(server: subprocess.Popen) -> None:
    """Between readiness polls: returns early if the server exits."""
    try:
        server.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass


def test_openai_server_from_launcher(served):
    """``launch/vllm_serve.sh RUN --tp 2`` answers a completion request for the adapter by name."""
    import json
    import socket
    import threading
    import urllib.request

    from tests.serving import ROOT, SERVE_PYTHON, serve_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**serve_env(), "BDLORA": str(Path(sys.executable).with_name("bdlora"))}
    env["VLLM_PYTHON"] = str(SERVE_PYTHON)
    run = served["runs"]["bd_a"]
    command = [str(ROOT / "launch" / "vllm_serve.sh"), str(run), "--tp", "2", "--port", str(port)]
    command += ["--max-model-len", "256", "--max-num-seqs", "8", "--enforce-eager"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    drain = threading.Thread(target=lambda: log.extend(server.stdout), daemon=True)  # never blocks it
    drain.start()
    watchdog = threading.Timer(400, server.kill)  # a server that never comes up fails the test
    watchdog.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not ready(url):
            if server.poll() is not None:
                pytest.fail("the server exited before it was ready:\n" + "".join(log[-40:]))
            server_wait(server)
        body = {"model": run.name, "prompt": served["prompts"][0], "max_tokens": 8, "temperature": 0}
        body.update(ignore_eos=True, logprobs=1, return_tokens_as_token_ids=True)  # ids, not bytes
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            models = [m["id"] for m in json.loads(response.read())["data"]]
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=120)
    assert run.name in models
    tokens = [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]
    assert tokens == served["bdlora"]["bd_a"][0]["tokens"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M (real weights, 9 heads: TP 1 or 3) with a BD-LoRA adapter, nblocks 3."""
    from transformers import AutoTokenizer

    from bdlora.train.export import load_model, open_run

    require_serve_venv()
    root = tmp_path_factory.mktemp("smollm2")
    run = train(
        root / "smol",
        "experiment=smollm2",
        "steps=3",
        "optim.lr=5e-3",
        "optim.warmup_steps=0",
        "data.num_examples=100",
        "data.seq_len=32",
        f"model.cache_dir={root / 'cache'}",
    )
    base = root / "cache" / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
    model = load_model(open_run(run), base)
    reference = [greedy_with_logprobs(model, ids, eos_token_id=-1) for ids in prompts]
    return {"root": root, "base": base, "run": run, "prompts": prompts, "reference": reference}


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_through_the_plugin_equals_bdlora(smollm2, tp):
    spec = {
        "model": str(smollm2["base"]),
        "tp": tp,
        "max_lora_rank": 16,
        "adapters": {"smol": str(smollm2["run"] / "adapter")},
        "prompts": smollm2["prompts"],
        "max_tokens": 8,
        "count_steps": 2,
        "mixed": False,
    }
    result = run_engine(spec, smollm2["root"])
    assert_same(result["single"]["smol"], smollm2["reference"], f"SmolLM2 at TP {tp}")
    assert [r["tokens"] for r in result["single"]["smol"]] != [r["tokens"] for r in result["single"]["base"]]
    if tp > 1:
        assert result["collectives"]["smol"] == result["collectives"]["base"]
