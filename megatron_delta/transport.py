"""Pipeline transport: how a DepthState crosses a pipeline-stage boundary.

Megatron's schedules send one tensor of one shape between stages ([s, b, h], with s divided by
CP and, under sequence parallelism, TP). A routed model must also send the sources that later
stages route over, so a stage packs its state along the sequence dimension into
[slots * s, b, h] and the next stage splits it back. Calling `forward_backward_func` with
`seq_length=pipeline_seq_length(...)` (and, for interleaved pipelines, `block.link_virtual_stages`
once on a rank's model chunks) is all a training loop changes: the schedules' shape logic, SP/CP
division, 1F1B and interleaving then work unpatched, and gradients of every source travel back
through the same buffer.

`slots` is the largest message of the layout (the schedule uses one shape for every chunk);
smaller ones are zero-padded. The state holds only what later stages need: for delta_block that
is x, the open block's partial sum (only when a boundary falls inside a block) and the B block
deltas so far, never one tensor per sublayer.

Interleaved pipelines (virtual stages): model chunk c runs on pipeline rank c mod pp, so a rank
runs chunk c and later chunk c + pp, and the state entering c + pp holds every source that
existed when chunk c ended (a source never changes once made). The rank keeps those sources
(`SourceCache`) and the message into chunk c + pp carries only the sources made since: each
source crosses each hop of the ring once. Their gradients take the same way back: the later
chunk's backward leaves the gradient of every kept source it read with the rank, and the earlier
chunk's backward (which the schedule runs after it for the same micro-batch, because it needs the
gradient that chunk starts) adds it to the source's gradient before sending that upstream.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from megatron_delta.config import DeltaResidualConfig
from megatron_delta.state import Bookkeeping, DepthState, StateLayout, layout_before_layer


@dataclasses.dataclass(frozen=True)
class Boundary:
    """The state entering a model chunk other than the first.

    `layout` is the whole state the chunk starts from; its `kept` oldest sources are already on
    the receiving rank (kept from the rank's previous chunk); the rest crosses the hop.
    """

    chunk: int  # the receiving model chunk, 1 .. pp * vpp - 1 (pipeline rank chunk % pp)
    first_layer: int  # 0-based global index of the receiving chunk's first layer
    layout: StateLayout
    kept: int

    @property
    def sent_tensors(self) -> int:
        return self.layout.num_tensors - self.kept


def boundaries(delta: DeltaResidualConfig, config) -> list:
    """Every Boundary of the layout, in chunk order (the boundary into chunk c is entry c - 1)."""
    pp = config.pipeline_model_parallel_size
    num_chunks = pp * (config.virtual_pipeline_model_parallel_size or 1)
    per_chunk = config.num_layers // num_chunks

    def layout(chunk):  # the state entering `chunk`, i.e. the state chunk - 1 ended with
        if not delta.routed:
            return StateLayout(True, False, 0)
        return layout_before_layer(delta, config.num_layers, chunk * per_chunk)

    # The receiving rank last ran chunk c - pp: it holds every source that existed when it ended.
    return [Boundary(c, c * per_chunk, layout(c), layout(c - pp + 1).num_sources if c >= pp else 0)
            for c in range(1, num_chunks)]


def pipeline_slots(delta: DeltaResidualConfig, config) -> int:
    """How many [s, b, h] tensors one pipeline message carries (1 for the standard model)."""
    return max([b.sent_tensors for b in boundaries(delta, config)], default=1)


def pipeline_seq_length(delta: DeltaResidualConfig, config, seq_length: int) -> int:
    """The `seq_length` to hand Megatron's forward_backward_func for this model."""
    return pipeline_slots(delta, config) * seq_length


def boundary_bytes(delta: DeltaResidualConfig, config, seq_length: int, micro_batch_size: int) -> list:
    """Bytes that cross each pipeline boundary per micro-batch, in each direction.

    Returns [{"boundary": first layer of the receiving chunk, "hop": (sending, receiving pipeline
    rank), "state_tensors": tensors of the state the receiving chunk starts from (all of which a
    transport without kept sources sends), "tensors": tensors that cross, "needed_bytes": their
    size, "sent_bytes": size of the padded message}].
    """
    tokens = seq_length // config.context_parallel_size
    if config.sequence_parallel:
        tokens //= config.tensor_model_parallel_size
    dtype = config.pipeline_dtype or config.params_dtype
    slot_bytes = tokens * micro_batch_size * config.hidden_size * torch.empty((), dtype=dtype).element_size()
    slots = pipeline_slots(delta, config)
    pp = config.pipeline_model_parallel_size
    return [
        {"boundary": b.first_layer, "hop": ((b.chunk - 1) % pp, b.chunk % pp),
         "state_tensors": b.layout.num_tensors, "tensors": b.sent_tensors,
         "needed_bytes": b.sent_tensors * slot_bytes, "sent_bytes": slots * slot_bytes}
        for b in boundaries(delta, config)
    ]


def pack(state: DepthState, kept: int, slots: int, dtype) -> torch.Tensor:
    """Concatenate what crosses the hop along the sequence dim, zero-padded to `slots`: x, the
    open block's partial sum, and the sources after the `kept` ones the receiver already holds.

    The result is a fresh (non-view) tensor, as the schedules' output deallocation requires.
    """
    head = [t for t in (state.hidden, state.partial) if t is not None]
    tensors = [t.to(dtype) for t in head + state.sources[kept:]]
    padding = [torch.zeros_like(tensors[0])] * (slots - len(tensors))
    return torch.cat(tensors + padding, dim=0)


def unpack(packed: torch.Tensor, rules: Bookkeeping, boundary: Boundary, slots: int,
           kept_sources: list) -> DepthState:
    """The state entering the chunk: the message's tensors, with `kept_sources` (the rank's own
    copies of the oldest sources) in front of the sources that crossed."""
    message = list(torch.split(packed, packed.shape[0] // slots, dim=0))[: boundary.sent_tensors]
    head = int(boundary.layout.has_hidden) + int(boundary.layout.has_partial)
    return DepthState.from_tensors(rules, boundary.layout, message[:head] + list(kept_sources) + message[head:])


# ---------------------------------------------------------------------------------------------
# Sources kept on a rank for its next model chunk (interleaved pipelines)


class KeptSources:
    """One micro-batch's sources that a model chunk keeps for the rank's next chunk, and the way
    back for their gradients. No copies: both chunks use the same storage."""

    def __init__(self):
        self._tensors = []  # what the next chunk will read
        self._readers = None  # the next chunk's leaves; their .grad is the gradient it leaves here

    def add(self, sources: list) -> list:
        """Keep `sources`; returns what this chunk uses in their place: the same tensors, whose
        gradient in this chunk's backward gains what the next chunk leaves for them."""
        start = len(self._tensors)
        tracked = [_AddLaterGradient.apply(s, self, start + i) for i, s in enumerate(sources)]
        self._tensors.extend(tracked)
        return tracked

    def read(self) -> list:
        """The kept sources for the next chunk, as leaves of its own graph (its backward must not
        run into this chunk's graph: the schedule runs each chunk's backward separately)."""
        self._readers = [t.detach().requires_grad_(t.requires_grad) for t in self._tensors]
        self._tensors = None
        return self._readers

    def later_gradient(self, index: int) -> torch.Tensor:
        if self._readers is None:
            raise RuntimeError("a model chunk's backward ran, but the rank's next chunk never read the "
                               "sources kept for it: run every chunk of the micro-batch, as Megatron's "
                               "interleaved schedule does")
        reader, self._readers[index] = self._readers[index], None
        if reader.grad is None:
            raise RuntimeError("a model chunk's backward ran before the backward of the rank's next chunk for "
                               "the same micro-batch, which must come first (it sends the gradient this "
                               "chunk starts from); use Megatron's interleaved schedule")
        return reader.grad


class _AddLaterGradient(torch.autograd.Function):
    """Identity on a kept source; in backward, adds the gradient the rank's next chunk left."""

    @staticmethod
    def forward(ctx, source, kept: KeptSources, index: int):
        ctx.kept, ctx.index = kept, index
        return source.view_as(source)

    @staticmethod
    def backward(ctx, grad):
        return grad + ctx.kept.later_gradient(ctx.index), None, None


class SourceCache:
    """What one pipeline rank keeps between its model chunks: per receiving virtual stage, the
    KeptSources of each micro-batch in flight, first in first out (the schedules run the
    forwards of every chunk in micro-batch order)."""

    def __init__(self):
        self._queues = collections.defaultdict(collections.deque)

    def put(self, vp_stage: int, kept: KeptSources) -> None:
        self._queues[vp_stage].append(kept)

    def take(self, vp_stage: int) -> KeptSources:
        if not self._queues[vp_stage]:
            raise RuntimeError(f"virtual stage {vp_stage} ran a micro-batch that virtual stage {vp_stage - 1} of "
                               "this rank has not run: run the chunks in Megatron's interleaved schedule")
        return self._queues[vp_stage].popleft()
