"""DepthState: what flows through the depth of a routed model, sublayer to sublayer.

    hidden   x, the ordinary residual stream (additive variants); None for replacement variants
    sources  completed sources the next sublayer routes over, starting with x_0 (the embedding)
    partial  block variants: the sum of the current block's sublayer outputs so far (None at a
             block start)

Bookkeeping per variant, after a sublayer produced its output (delta) v:

    delta, attnres_full        sources += [v]
    delta_block, attnres_block partial += v; at the end of block b: sources += [partial], i.e.
                               D_b = sum of that block's v (never partial - sources[-1])
    additive variants          hidden += v

A sublayer routes over `sources`, plus, for attnres_block, the current partial block (Kimi's
intra-block term).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

from megatron_delta.config import DeltaResidualConfig


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Which tensors a DepthState holds at a given depth (the same on every rank)."""

    has_hidden: bool
    has_partial: bool
    num_sources: int

    @property
    def num_tensors(self) -> int:
        return int(self.has_hidden) + int(self.has_partial) + self.num_sources


def layout_before_layer(delta: DeltaResidualConfig, num_layers: int, layer_index: int) -> StateLayout:
    """Layout of the state entering the layer with 0-based global index `layer_index`."""
    if delta.uses_blocks:
        per_block = delta.layers_per_block(num_layers)
        completed_blocks = layer_index // per_block
        return StateLayout(delta.additive, layer_index % per_block != 0, 1 + completed_blocks)
    return StateLayout(delta.additive, False, 1 + 2 * layer_index)


@dataclasses.dataclass(frozen=True)
class Bookkeeping:
    """What a variant does with the state, fixed once when the model is built."""

    keeps_stream: bool  # additive variants: x is kept and every v is added to it
    sums_blocks: bool  # block variants: v goes into the open block's partial sum
    routes_partial: bool  # attnres_block: the open block's partial sum is routed over too

    @classmethod
    def of(cls, delta: DeltaResidualConfig) -> "Bookkeeping":
        return cls(delta.additive, delta.uses_blocks, delta.variant == "attnres_block")


@dataclasses.dataclass
class DepthState:
    rules: Bookkeeping
    hidden: Optional[Tensor]
    sources: list
    partial: Optional[Tensor] = None

    @classmethod
    def start(cls, rules: Bookkeeping, embedding: Tensor) -> "DepthState":
        return cls(rules, embedding if rules.keeps_stream else None, [embedding])

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.hidden is not None, self.partial is not None, len(self.sources))

    def route_sources(self) -> list:
        if self.rules.routes_partial and self.partial is not None:
            return self.sources + [self.partial]
        return self.sources

    def add_output(self, v: Tensor) -> "DepthState":
        hidden = self.hidden + v if self.rules.keeps_stream else None
        if self.rules.sums_blocks:
            partial = v if self.partial is None else self.partial + v
            return DepthState(self.rules, hidden, self.sources, partial)
        return DepthState(self.rules, hidden, self.sources + [v])

    def close_block(self) -> "DepthState":
        return DepthState(self.rules, self.hidden, self.sources + [self.partial])

    # Flat tensor form, for reentrant activation checkpointing and pipeline packing.
    def tensors(self) -> list:
        return [t for t in (self.hidden, self.partial) if t is not None] + self.sources

    @classmethod
    def from_tensors(cls, rules: Bookkeeping, layout: StateLayout, tensors) -> "DepthState":
        tensors = list(tensors)
        hidden = tensors.pop(0) if layout.has_hidden else None
        partial = tensors.pop(0) if layout.has_partial else None
        assert len(tensors) == layout.num_sources, (len(tensors), layout)
        return cls(rules, hidden, tensors, partial)
