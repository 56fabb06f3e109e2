"""megatron-delta: Delta Attention Residuals for Megatron-Core GPT models.

Public names are imported lazily so that light commands (`megatron-delta preprocess`, `plan`)
do not pay for importing the model stack.
"""

import importlib

_EXPORTS = {
    "DeltaConfigError": "megatron_delta.config",
    "DeltaResidualConfig": "megatron_delta.config",
    "DeltaGPTModel": "megatron_delta.model",
    "get_gpt_delta_layer_spec": "megatron_delta.model",
    "get_gpt_delta_decoder_block_spec": "megatron_delta.model",
    "get_gpt_delta_mtp_block_spec": "megatron_delta.model",
    "get_gpt_delta_model_specs": "megatron_delta.model",
    "collect_routing_stats": "megatron_delta.routing",
    "boundary_bytes": "megatron_delta.transport",
    "link_virtual_stages": "megatron_delta.block",
    "pipeline_seq_length": "megatron_delta.transport",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_delta' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
