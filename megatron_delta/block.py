"""DeltaTransformerBlock: a TransformerBlock whose layers pass a DepthState instead of a tensor.

Megatron's block is reused for building (layer numbering with pipeline offsets, final norm,
sharded_state_dict); forward is ours because the thing that flows from layer to layer is the
residual stream *plus* its sources:

    first stage:  state = start(embedding)        later stages: state = unpack(input_tensor)
                                                  (+ the sources this rank kept, interleaved PP)
    for layer:    state = layer(state)            (optionally under full activation recompute;
                                                  delta_block routes a block's sublayers at once)
    last stage:   Norm(x), or for replacement variants Norm(route(sources))   (Kimi's final AttnRes)
    other stages: pack(state)  -> one [slots * s, b, h] tensor for Megatron's p2p
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from megatron_delta import transport
from megatron_delta.routing import DepthRouter, route_sublayers
from megatron_delta.state import Bookkeeping, DepthState


class DeltaTransformerBlock(TransformerBlock):
    def __init__(self, config, spec, delta, post_layer_norm=True, pre_process=True, post_process=True,
                 pg_collection=None, vp_stage=None):
        super().__init__(config, spec, post_layer_norm=post_layer_norm, pre_process=pre_process,
                         post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        self.delta = delta
        self.rules = Bookkeeping.of(delta)
        # delta_block: all sublayers of a block read the same sources, so they are routed at once.
        self.routes_blocks_at_once = delta.block_sources_fixed
        self.vp_stage = vp_stage
        self.pipeline_slots = transport.pipeline_slots(delta, config)
        # This chunk's place in the pipeline ring (chunk c runs on pipeline rank c % pp).
        boundaries = transport.boundaries(delta, config)
        chunk = (self.layers[0].layer_number - 1) // (config.num_layers // (len(boundaries) + 1))
        self.boundary_in = boundaries[chunk - 1] if chunk > 0 else None
        self.boundary_out = boundaries[chunk] if chunk < len(boundaries) else None
        # Interleaved PP: the rank runs chunk + pp later, which reads the sources kept from here.
        self.keeps_sources = chunk + config.pipeline_model_parallel_size <= len(boundaries)
        self.source_cache = None  # a transport.SourceCache shared with the rank's other chunks
        # Replacement routing has no residual stream: the last stage routes once more over all
        # sources to form the final hidden state. Lives next to the final norm it feeds.
        self.final_router = (
            DepthRouter(config, delta, "final")
            if self.final_layernorm is not None and not delta.additive else None
        )

    def forward(self, hidden_states, attention_mask, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None,
                padding_mask=None, **unsupported):
        if context is not None or unsupported.get("inference_params"):
            raise NotImplementedError(
                "DeltaGPTModel has no cross-attention; pass KV-cache state as inference_context"
            )
        if self.pre_process:
            if isinstance(hidden_states, WrappedTensor):  # GPTModel wraps the embedding for inference
                hidden_states = hidden_states.unwrap()
            embedding = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
            state = DepthState.start(self.rules, embedding)
        else:
            kept = self._source_cache().take(self.vp_stage).read() if self.boundary_in.kept else []
            state = transport.unpack(self.input_tensor, self.rules, self.boundary_in, self.pipeline_slots, kept)

        layer_kwargs = dict(
            attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask, inference_context=inference_context,
        )
        rng_context = (
            tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        )
        delayed_fp8 = self.config.fp8 and self.config.fp8_recipe == Fp8Recipe.delayed
        handoff = transport.KeptSources() if self.keeps_sources else None
        if handoff is not None:
            state = dataclasses.replace(state, sources=handoff.add(state.sources))
        received = len(state.sources)
        with rng_context, (get_fp8_context(self.config) if delayed_fp8 else nullcontext()):
            for start, end, recompute in self.layer_groups():
                if recompute:
                    state = self._checkpointed(start, end, state, layer_kwargs)
                else:
                    state = self._run_layers(start, end, state, layer_kwargs)
        if handoff is not None:
            # Sources made here cross to the next chunk, so their gradient passes the handoff.
            made = handoff.add(state.sources[received:])
            state = dataclasses.replace(state, sources=state.sources[:received] + made)
            self._source_cache().put(self.vp_stage + 1, handoff)

        if self.final_layernorm is None:
            dtype = self.config.pipeline_dtype or state.sources[0].dtype
            return transport.pack(state, self.boundary_out.kept, self.pipeline_slots, dtype)
        final = state.hidden if self.final_router is None else self.final_router(state.sources)
        return make_viewless_tensor(self.final_layernorm(final), requires_grad=True, keep_graph=True)

    def _run_layers(self, start, end, state, layer_kwargs):
        per_layer_fp8 = self.config.fp8 and self.config.fp8_recipe != Fp8Recipe.delayed
        for run in self.routing_runs(self.layers[start:end]):
            for layer, routed in zip(run, self._route_run(run, state)):
                with get_fp8_context(self.config, layer.layer_number - 1) if per_layer_fp8 else nullcontext():
                    state = layer(state, routed=routed, **layer_kwargs)
        return state

    def routing_runs(self, layers):
        """Runs of consecutive layers whose sublayers all read the same sources. delta_block: the
        layers of one block (its sources change only when it closes); the other variants' sources
        change every sublayer, so their layers route for themselves (one run, nothing routed ahead)."""
        if not self.routes_blocks_at_once:
            return [layers]
        runs, run = [], []
        for layer in layers:
            run.append(layer)
            if layer.ends_block:
                runs.append(run)
                run = []
        return runs + [run] if run else runs

    def _route_run(self, run, state):
        """[(attention, MLP) routed terms] of the run's layers, in one pass over the sources
        (the block-level kernel on GPU), or (None, None) for layers that route for themselves."""
        if not self.routes_blocks_at_once:
            return [(None, None)] * len(run)
        routed = route_sublayers([r for layer in run for r in (layer.attention_router, layer.mlp_router)],
                                 state.sources)
        return list(zip(routed[0::2], routed[1::2]))

    def _source_cache(self):
        if self.source_cache is None:
            raise RuntimeError(
                f"virtual pipeline stage {self.vp_stage} shares sources with this rank's other model chunks: "
                "call megatron_delta.link_virtual_stages(model_chunks) once after building them"
            )
        return self.source_cache

    def layer_groups(self):
        """(start, end, recompute) ranges of local layers, following Megatron's full-recompute
        methods: 'uniform' checkpoints every group of recompute_num_layers, 'block' checkpoints
        the first recompute_num_layers layers one by one."""
        n = len(self.layers)
        if not (self.config.recompute_granularity == "full" and self.training):
            return [(0, n, False)]
        k = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        return [(i, i + 1, i < k) for i in range(n)]

    def _checkpointed(self, start, end, state, layer_kwargs):
        """Run layers [start, end) under reentrant activation checkpointing.

        The checkpoint function sees only tensors, so the state goes in flat and only what the
        layers created comes out (unchanged inputs are re-attached outside)."""
        layout, old_sources = state.layout, state.sources

        def run(*tensors):
            out = self._run_layers(start, end, DepthState.from_tensors(self.rules, layout, tensors), layer_kwargs)
            return (out.hidden, out.partial, *out.sources[len(old_sources):])

        if self.config.fp8:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            outputs = te_checkpoint(run, self.config.distribute_saved_activations,
                                    tensor_parallel.random.get_cuda_rng_tracker, self.pg_collection.tp,
                                    *state.tensors())
        else:
            outputs = tensor_parallel.checkpoint(run, self.config.distribute_saved_activations, *state.tensors())
        hidden, partial, *new_sources = outputs
        return DepthState(self.rules, hidden, old_sources + new_sources, partial)


def link_virtual_stages(model_chunks) -> None:
    """Give one pipeline rank's model chunks (a list, wrapped or not) one transport.SourceCache, so
    that an interleaved pipeline sends each source across each hop once. Call it once after
    building the chunks (train, parity and the Megatron-LM schedule wrapper do); calling it again
    is harmless."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    blocks = [m for chunk in chunks for m in chunk.modules() if isinstance(m, DeltaTransformerBlock)]
    if all(block.source_cache is not None and block.source_cache is blocks[0].source_cache for block in blocks):
        return  # linked already (or nothing to link)
    cache = transport.SourceCache()
    for block in blocks:
        block.source_cache = cache
