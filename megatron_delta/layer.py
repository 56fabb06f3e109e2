"""DeltaTransformerLayer: Megatron's TransformerLayer whose two sublayers read a routed input.

For each sublayer (attention, then MLP):

    h = x + route(sources)        additive variants   (x: the residual stream, kept; on GPU the
                                  add is fused into the routing kernel)
    h = route(sources)            replacement variants
    v = dropout(f(Norm(h)) + bias)                     (the spec's bias-dropout-add)
    x = x + v;  v joins the sources (see state.py for the per-variant bookkeeping)

The routing parameters come from the layer spec like every other submodule
(DeltaTransformerLayerSubmodules.attention_router / mlp_router, built by build_module), so
checkpoints stack them per layer and reshard them across pipeline layouts like every other layer
weight. The norm may be a separate module (local spec) or fused into the next linear (TE spec:
the fused LayerNorm-linear sees h); either way h is what goes in. Everything Megatron builds for
the layer (attention, MLP, norms, bias-dropout-add, their TP/SP handling, selective recompute of
core attention) is reused.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_delta.routing import DepthRouter
from megatron_delta.state import DepthState


@dataclasses.dataclass
class DeltaTransformerLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus the depth routers of the two sublayers."""

    attention_router: Union[ModuleSpec, type] = IdentityOp
    mlp_router: Union[ModuleSpec, type] = IdentityOp


class DeltaTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: DeltaTransformerLayerSubmodules, layer_number=1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, delta=None, **megatron_kwargs):
        # megatron_kwargs: what newer releases add (is_mtp_layer, pp_layer_offset, name, ...; see compat.py)
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage, **megatron_kwargs)
        name = f"layer_{self.layer_number:02d}"
        self.attention_router = build_module(submodules.attention_router, config=config, label=f"{name}.attention")
        self.mlp_router = build_module(submodules.mlp_router, config=config, label=f"{name}.mlp")
        per_block = delta.layers_per_block(config.num_layers)
        self.ends_block = delta.uses_blocks and (
            self.layer_number % per_block == 0 or self.layer_number == config.num_layers
        )

    def forward(self, state: DepthState, attention_mask=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask=None, inference_context=None,
                routed=(None, None)) -> DepthState:
        """`routed`: the (attention, MLP) routed terms when the block already computed them
        (delta_block routes all sublayers of a block in one pass); computed here otherwise.
        With a KV cache (`inference_context`) only attention sees it: routing is per token, so
        new tokens route over their own sources."""
        def attention(h):
            return self.self_attention(
                self.input_layernorm(h), attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, inference_context=inference_context,
            )

        def mlp(h):
            normed = self.pre_mlp_layernorm(h)
            if self.recompute_mlp:
                return tensor_parallel.checkpoint(
                    lambda x: self.mlp(x, padding_mask=padding_mask), False, normed
                )
            return self.mlp(normed, padding_mask=padding_mask)

        sublayers = ((self.attention_router, attention, self.self_attn_bda, routed[0]),
                     (self.mlp_router, mlp, self.mlp_bda, routed[1]))
        return self.advance(state, lambda state, index: self._sublayer(state, *sublayers[index]))

    def advance(self, state: DepthState, sublayer) -> DepthState:
        """The layer's depth bookkeeping: attention (index 0), then MLP (1), each output
        v = sublayer(state, index) joining the state; a block closes after its last layer.
        `megatron-delta plan` walks a stage through this same method with placeholder outputs."""
        for index in range(2):
            state = state.add_output(sublayer(state, index))
        return state.close_block() if self.ends_block else state

    def _sublayer(self, state: DepthState, router: DepthRouter, op, bias_dropout_add, routed):
        """The sublayer's output v (not yet added to the state)."""
        # h = x + r (additive) or h = r (replacement: no x). Precomputed terms come only from
        # delta_block, which is additive.
        if routed is None:
            h = router(state.route_sources(), residual=state.hidden)
        else:
            h = state.hidden + routed
        output_with_bias = op(h)
        # The spec's bias-dropout-add (fused as config.bias_dropout_fusion says) onto a zero
        # residual: v is needed alone (it joins the sources); the state adds it to x.
        with self.bias_dropout_add_exec_handler():
            v = bias_dropout_add(self.training, self.config.bias_dropout_fusion)(
                output_with_bias, torch.zeros((), dtype=h.dtype, device=h.device), self.hidden_dropout
            )
        return v
