"""The transformers side of megatron-delta: configuration_delta.py and modeling_delta.py are
self-contained modules (torch + transformers only) that `convert export` copies into each exported
model directory, named in its config.json `auto_map`. Nothing here imports transformers."""

import os

MODEL_CODE_FILES = ("configuration_delta.py", "modeling_delta.py")
MODEL_CODE_DIR = os.path.dirname(os.path.abspath(__file__))
# family (the base model_type) -> (our model_type, config class, causal-LM class)
FAMILIES = {
    "qwen3": ("delta_qwen3", "DeltaQwen3Config", "DeltaQwen3ForCausalLM"),
    "llama": ("delta_llama", "DeltaLlamaConfig", "DeltaLlamaForCausalLM"),
    "qwen3_moe": ("delta_qwen3_moe", "DeltaQwen3MoeConfig", "DeltaQwen3MoeForCausalLM"),
}
