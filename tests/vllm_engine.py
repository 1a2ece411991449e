"""One vLLM engine at one TP degree, walking every serving check; run with the serving venv's python.

``python tests/vllm_engine.py SPEC.json OUT.json``. The spec names the base model, the adapters and
the prompts (token ids); the result holds greedy tokens and their logprobs per adapter, a mixed
batch, what each TP worker holds of each adapter, the collectives each worker issued per decode
step, and what a refused adapter did. The test (``tests/test_serve_vllm.py``) compares them with
bdlora and PEFT run in the trainer's environment. Not collected by pytest: vLLM is not importable
there.
"""

from __future__ import annotations

import json
import os
import sys

# Before vLLM starts its workers: one thread each (TP hangs on 2 cores otherwise), and functions
# sent to the workers by collective_rpc.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

COUNTED = ("all_reduce", "all_gather", "gather", "reduce_scatter", "broadcast", "broadcast_tensor_dict")


def install_counter(worker) -> None:
    """Count every collective the TP group issues on this worker (wraps the group's methods)."""
    from vllm.distributed import parallel_state

    group = parallel_state.get_tp_group()
    worker.bdlora_counts = dict.fromkeys(COUNTED, 0)
    for op in COUNTED:
        method = getattr(group, op)

        def counted(*args, _op=op, _method=method, **kwargs):
            worker.bdlora_counts[_op] += 1
            return _method(*args, **kwargs)

        setattr(group, op, counted)


def read_counts(worker) -> dict:
    counts = dict(worker.bdlora_counts)
    worker.bdlora_counts = dict.fromkeys(COUNTED, 0)
    return counts


def adapter_holdings(worker) -> list[dict]:
    """Per plugin layer: buffer shapes and the non-zero count of each slot's BD-LoRA and dense factors."""
    rows = []
    for name, module in worker.model_runner.model.named_modules():
        if not hasattr(module, "bd_a_stacked"):
            continue
        rows.append(
            {
                "module": name,
                "layer": type(module).__name__,
                "tp_rank": module.tp_rank,
                "bd_a_shape": [list(t.shape) for t in module.bd_a_stacked],
                "bd_b_shape": [list(t.shape) for t in module.bd_b_stacked],
                "bd_a_nnz": [
                    [int(t[i].count_nonzero()) for i in range(t.shape[0])] for t in module.bd_a_stacked
                ],
                "bd_b_nnz": [
                    [int(t[i].count_nonzero()) for i in range(t.shape[0])] for t in module.bd_b_stacked
                ],
                "dense_nnz": sum(
                    int(t.count_nonzero()) for t in module.lora_a_stacked + module.lora_b_stacked
                ),
            }
        )
    return rows


def tokens_and_logprobs(outputs) -> list[dict]:
    result = []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        lps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs)]
        result.append({"tokens": ids, "logprobs": lps})
    return result


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(open(spec_path).read())
    llm = LLM(
        model=spec["model"],
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=len(spec["adapters"]) + 1,
        dtype="float32",
        max_model_len=spec.get("max_model_len", 256),
        enforce_eager=True,
        tensor_parallel_size=spec["tp"],
        max_num_seqs=32,
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    greedy = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=1, ignore_eos=True)
    requests = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())
    }
    result: dict = {"tp": spec["tp"]}

    llm.collective_rpc(install_counter)
    first = spec.get("holdings_adapter")
    if first:  # before any other adapter takes a slot: what each worker holds of this one
        llm.generate(prompts[:1], greedy, lora_request=requests[first], use_tqdm=False)
        result["holdings"] = llm.collective_rpc(adapter_holdings)

    result["single"] = {
        name: tokens_and_logprobs(llm.generate(prompts, greedy, lora_request=req, use_tqdm=False))
        for name, req in [("base", None), *requests.items()]
    }

    if spec.get("mixed", True):  # one batch mixing every adapter and the base, each prompt under each
        names = ["base", *requests]
        mixed_prompts = [p for p in prompts for _ in names]
        mixed_requests = [requests.get(n) for _ in prompts for n in names]
        mixed = tokens_and_logprobs(
            llm.generate(mixed_prompts, greedy, lora_request=mixed_requests, use_tqdm=False)
        )
        result["mixed"] = [
            {"prompt": i // len(names), "adapter": names[i % len(names)], **row}
            for i, row in enumerate(mixed)
        ]

    # Collectives per generate call of a fixed number of decode steps, with and without each adapter.
    steps = SamplingParams(temperature=0, max_tokens=spec["count_steps"], ignore_eos=True)
    result["collectives"] = {}
    for name, req in [("base", None), *requests.items()] if spec["tp"] > 1 else []:
        llm.collective_rpc(read_counts)
        llm.generate(prompts[:1], steps, lora_request=req, use_tqdm=False)
        result["collectives"][name] = llm.collective_rpc(read_counts)

    bad = spec.get("refused_adapter")
    if bad:
        try:
            llm.generate(prompts[:1], greedy, lora_request=LoRARequest("refused", 99, bad), use_tqdm=False)
            result["refused"] = {"error": None}
        except Exception as exc:  # noqa: BLE001 - the test reads the message
            result["refused"] = {"error": f"{type(exc).__name__}: {exc}"}
        after = llm.generate(prompts, greedy, lora_request=requests[first], use_tqdm=False) if first else []
        result["refused"]["after"] = tokens_and_logprobs(after)

    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
