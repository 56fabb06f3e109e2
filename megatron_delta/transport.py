"""Pipeline transport: how a DepthState crosses a pipeline-stage boundary.

Megatron's schedules send one tensor of one shape between stages ([s, b, h], with s divided by
CP and, under sequence parallelism, TP). A routed model must also send the sources that later
stages route over, so a stage packs its state along the sequence dimension into
[slots * s, b, h] and the next stage splits it back. Calling `forward_backward_func` with
`seq_length=pipeline_seq_length(...)` is all a training loop changes: the schedules' shape
logic, SP/CP division, 1F1B and interleaving then work unpatched, and gradients of every
source travel back through the same buffer.

`slots` is the largest state that crosses any boundary of the layout (the schedule uses one
shape for every chunk); smaller states are zero-padded. The state holds only what later stages
need: for delta_block that is x, the open block's partial sum (only when a boundary falls inside
a block) and the B block deltas so far, never one tensor per sublayer.
"""

from __future__ import annotations

import torch

from megatron_delta.config import DeltaResidualConfig
from megatron_delta.state import DepthState, StateLayout, layout_before_layer


def stage_boundaries(config) -> list:
    """0-based global index of the first layer of every model chunk except the first one."""
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size or 1
    per_chunk = config.num_layers // (pp * vpp)
    return [k * per_chunk for k in range(1, pp * vpp)]


def boundary_layouts(delta: DeltaResidualConfig, config) -> list:
    """[(first layer of the receiving chunk, StateLayout sent to it)] for every boundary."""
    if not delta.routed:
        return [(b, StateLayout(True, False, 0)) for b in stage_boundaries(config)]
    return [(b, layout_before_layer(delta, config.num_layers, b)) for b in stage_boundaries(config)]


def pipeline_slots(delta: DeltaResidualConfig, config) -> int:
    """How many [s, b, h] tensors one pipeline message carries (1 for the standard model)."""
    return max([layout.num_tensors for _, layout in boundary_layouts(delta, config)], default=1)


def pipeline_seq_length(delta: DeltaResidualConfig, config, seq_length: int) -> int:
    """The `seq_length` to hand Megatron's forward_backward_func for this model."""
    return pipeline_slots(delta, config) * seq_length


def boundary_bytes(delta: DeltaResidualConfig, config, seq_length: int, micro_batch_size: int) -> list:
    """Bytes that cross each pipeline boundary per micro-batch, in each direction.

    Returns [{"boundary": first layer of the receiving chunk, "tensors": state tensors needed,
    "needed_bytes": their size, "sent_bytes": size of the padded message}].
    """
    tokens = seq_length // config.context_parallel_size
    if config.sequence_parallel:
        tokens //= config.tensor_model_parallel_size
    dtype = config.pipeline_dtype or config.params_dtype
    slot_bytes = tokens * micro_batch_size * config.hidden_size * torch.empty((), dtype=dtype).element_size()
    slots = pipeline_slots(delta, config)
    return [
        {"boundary": b, "tensors": layout.num_tensors,
         "needed_bytes": layout.num_tensors * slot_bytes, "sent_bytes": slots * slot_bytes}
        for b, layout in boundary_layouts(delta, config)
    ]


def pack(state: DepthState, slots: int, dtype) -> torch.Tensor:
    """Concatenate the state's tensors along the sequence dim, zero-padded to `slots`.

    The result is a fresh (non-view) tensor, as the schedules' output deallocation requires.
    """
    tensors = [t.to(dtype) for t in state.tensors()]
    padding = [torch.zeros_like(tensors[0])] * (slots - len(tensors))
    return torch.cat(tensors + padding, dim=0)


def unpack(packed: torch.Tensor, delta: DeltaResidualConfig, layout: StateLayout, slots: int) -> DepthState:
    chunks = torch.split(packed, packed.shape[0] // slots, dim=0)
    return DepthState.from_tensors(delta, layout, chunks[: layout.num_tensors])
