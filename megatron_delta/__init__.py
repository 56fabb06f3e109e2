"""megatron-delta: Delta Attention Residuals for Megatron-Core GPT models."""

from megatron_delta.config import DeltaConfigError, DeltaResidualConfig
from megatron_delta.model import DeltaGPTModel, get_gpt_delta_layer_spec
from megatron_delta.routing import collect_routing_stats
from megatron_delta.transport import boundary_bytes, pipeline_seq_length

__all__ = [
    "DeltaConfigError",
    "DeltaResidualConfig",
    "DeltaGPTModel",
    "get_gpt_delta_layer_spec",
    "collect_routing_stats",
    "boundary_bytes",
    "pipeline_seq_length",
]
