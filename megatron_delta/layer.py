"""DeltaTransformerLayer: Megatron's TransformerLayer whose two sublayers read a routed input.

For each sublayer (attention, then MLP):

    h = x + route(sources)        additive variants   (x: the residual stream, kept; on GPU the
                                  add is fused into the routing kernel)
    h = route(sources)            replacement variants
    v = dropout(f(Norm(h)) + bias)
    x = x + v;  v joins the sources (see state.py for the per-variant bookkeeping)

The layer owns the routing parameters (`attention_router`, `mlp_router`), so checkpoints stack
them per layer and reshard them across pipeline layouts like every other layer weight. The
norm may be a separate module (local spec) or fused into the next linear (TE spec: the fused
LayerNorm-linear sees h); either way h is what goes in. Everything Megatron builds for the layer
(attention, MLP, norms, their TP/SP handling, selective recompute of core attention) is reused.
"""

from __future__ import annotations

import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_delta.routing import DepthRouter
from megatron_delta.state import DepthState


class DeltaTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number=1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, delta=None):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        self.delta = delta
        name = f"layer_{self.layer_number:02d}"
        self.attention_router = DepthRouter(config, delta, f"{name}.attention")
        self.mlp_router = DepthRouter(config, delta, f"{name}.mlp")
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

        state = self._sublayer(state, self.attention_router, attention, routed[0])
        state = self._sublayer(state, self.mlp_router, mlp, routed[1])
        return state.close_block() if self.ends_block else state

    def _sublayer(self, state: DepthState, router: DepthRouter, op, routed) -> DepthState:
        # h = x + r (additive) or h = r (replacement: no x). Precomputed terms come only from
        # delta_block, which is additive.
        if routed is None:
            h = router(state.route_sources(), residual=state.hidden)
        else:
            h = state.hidden + routed
        output, bias = op(h)
        # Megatron's bias-dropout-add, with the add to x done by the state: v is needed alone.
        with self.bias_dropout_add_exec_handler():
            v = F.dropout(output if bias is None else output + bias, p=self.hidden_dropout,
                          training=self.training)
        return state.add_output(v)
