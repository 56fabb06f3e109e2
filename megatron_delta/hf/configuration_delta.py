"""Configurations of the transformers models that `megatron-delta convert export` writes.

A Delta Attention Residuals model is a Qwen3, Llama or Qwen3-MoE model plus depth routing, described by one
extra field, `delta` (megatron_delta.DeltaResidualConfig as a dict: variant, num_blocks, init,
norm_epsilon). The model types are our own ("delta_qwen3", "delta_llama", "delta_qwen3_moe"), so a transformers
that has not run this file (no trust_remote_code) refuses the directory instead of building a
plain model of the family without the routing.

This file and modeling_delta.py are copied into every exported directory and import only torch
and transformers (written against transformers 5.24).
"""

from huggingface_hub.dataclasses import strict  # transformers' own config validation (a dependency of it)
from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig


@strict
class DeltaQwen3Config(Qwen3Config):
    model_type = "delta_qwen3"
    delta: dict | None = None


@strict
class DeltaLlamaConfig(LlamaConfig):
    model_type = "delta_llama"
    delta: dict | None = None


@strict
class DeltaQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "delta_qwen3_moe"
    delta: dict | None = None
