"""Each point where bdlora's plugin reaches into vLLM, checked on its own in the serving venv.

``python tests/vllm_contact.py ADAPTER_DIR`` prints a JSON map from each entry of
``bdlora.serve.vllm_plugin.CONTACT_POINTS`` to "ok" or what broke; ``tests/test_vllm_contact.py``
asserts one entry per test, so a new vLLM release names exactly what to change. ``ADAPTER_DIR``
holds a PEFT BD-LoRA adapter with nblocks=2.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from types import SimpleNamespace

from bdlora.serve import vllm_plugin


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def peft_helper_features(adapter: str) -> None:
    """vLLM refuses use_bdlora with exactly the message the plugin removes, and only that one."""
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(adapter, None)
    before = helper._validate_features()
    assert before == [vllm_plugin.VLLM_BDLORA_REFUSAL], before
    vllm_plugin.register()
    assert PEFTHelper.from_local_dir(adapter, None)._validate_features() == []


def peft_helper_legal(adapter: str) -> None:
    """validate_legal(lora_config) runs on each worker before any weight is read."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    vllm_plugin.register()
    helper = PEFTHelper.from_local_dir(adapter, None)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=8, fully_sharded_loras=True))
    except ValueError as err:
        assert "fully_sharded_loras" in str(err), err
    else:
        raise AssertionError("a BD-LoRA adapter passed under fully_sharded_loras")


def input_processor(adapter: str) -> None:
    """InputProcessor._validate_lora(self, lora_request) sees every request before the engine."""
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.input_processor import InputProcessor

    assert params(InputProcessor._validate_lora) == ["self", "lora_request"]
    vllm_plugin.register()
    lora = SimpleNamespace(fully_sharded_loras=False)
    parallel = SimpleNamespace(tensor_parallel_size=4)
    config = SimpleNamespace(parallel_config=parallel, lora_config=lora)
    fake = SimpleNamespace(lora_config=lora, tokenizer=None, vllm_config=config)
    try:
        InputProcessor._validate_lora(fake, LoRARequest("a", 1, adapter))
    except ValueError as err:
        assert "nblocks=2" in str(err) and "degree 4" in str(err), err
    else:
        raise AssertionError("nblocks=2 passed at TP 4")


def lora_classes(_: str) -> None:
    """from_layer() tries vllm.lora.utils._all_lora_classes in order; the plugin's go first."""
    import vllm.lora.utils as lora_utils

    assert callable(lora_utils.from_layer)
    before = lora_utils._all_lora_classes
    assert isinstance(before, tuple)
    vllm_plugin.register()
    ours = lora_utils._all_lora_classes[:4]
    assert [c.__name__ for c in ours] == [
        "BlockDiagonalColumnLoRA",
        "BlockDiagonalMergedColumnLoRA",
        "BlockDiagonalQKVLoRA",
        "BlockDiagonalRowLoRA",
    ]
    for cls in ours:
        assert cls.__mro__[2] in before, cls.__mro__  # vLLM's own layer, still listed after ours


def layer_methods(_: str) -> None:
    """The vLLM layer methods the plugin overrides keep their signatures and attributes."""
    from vllm.lora.layers import (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )

    for cls in (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    ):
        assert params(cls.create_lora_weights) == ["self", "max_loras", "lora_config", "model_config"]
        assert params(cls.reset_lora) == ["self", "index"]
        assert params(cls.set_lora) == ["self", "index", "lora_a", "lora_b"]
        assert params(cls._apply_lora_to_output) == ["self", "x", "output"]
        assert callable(cls.can_replace_layer)
    init = inspect.getsource(MergedQKVParallelLinearWithLoRA.__init__)
    assert "self.output_ids" in init and "self.output_slices" in init
    assert "self.output_sizes" in inspect.getsource(MergedColumnParallelLinearWithLoRA.__init__)


def punica(_: str) -> None:
    """add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices) on every wrapper."""
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for cls in (PunicaWrapperBase, PunicaWrapperCPU):
        assert params(cls.add_lora_linear)[:7] == [
            "self",
            "y",
            "x",
            "lora_a_stacked",
            "lora_b_stacked",
            "scale",
            "output_slices",
        ]


CHECKS = dict(
    zip(
        vllm_plugin.CONTACT_POINTS,
        (peft_helper_features, peft_helper_legal, input_processor, lora_classes, layer_methods, punica),
    )
)


def main(adapter: str) -> None:
    import vllm

    vllm_plugin.check_version(vllm.__version__)
    results = {}
    for point, check in CHECKS.items():
        try:
            check(adapter)
            results[point] = "ok"
        except Exception:  # noqa: BLE001 - reported per point
            results[point] = traceback.format_exc(limit=4)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
