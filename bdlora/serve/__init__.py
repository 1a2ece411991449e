"""Serving BD-LoRA adapters: the vLLM plugin and the per-rank slicing it applies.

``shards`` holds the slicing math (plain torch, no vLLM); ``vllm_plugin`` is the only module that
reaches into vLLM.
"""
