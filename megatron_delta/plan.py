"""`megatron-delta plan --config RUN.yaml --nodes N --gpus-per-node G [--gpu-memory-gb 80]`

What one GPU of every pipeline stage holds, before a job is launched: parameters, weights, gradients,
optimizer state, activations and pipeline traffic, and whether that fits the GPU. TP and DP ranks of a
stage hold the same amounts, so there is one row per pipeline rank.

Exact (counted on real Megatron models):
    parameters     each pipeline rank's model chunks are built as `megatron-delta train` builds them,
                   on the meta device (no memory), in a one-process torch.distributed world of the
                   "fake" backend whose ranks say "tensor-parallel rank 0 of pipeline rank r": Megatron
                   shards every layer for the real TP size and builds the real layers of that stage.
                   MoE: the world also has the expert groups, so a rank holds its EP rank's experts
                   (each split over expert TP).
    MoE traffic    moe_collective_bytes: what the token dispatcher hands to all-gather, reduce-scatter
                   and all-to-all per MoE layer and micro-batch, forward and backward (all-to-all:
                   what a rank receives follows the routing; counted balanced, the mean over ranks).
    sends          transport.boundary_bytes: the packed DepthState a stage sends per micro-batch (and
                   the gradient of the same size it receives back).

Estimated (per micro-batch, the tensors autograd keeps for backward, counted tensor by tensor as in
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", for this
layer: GQA attention, SwiGLU/GeLU MLP, RMSNorm, RoPE, TP/SP sharding), plus what routing adds:
    routing        per routed sublayer the per-token scalars of K sources (DepthRoute on CPU: dot,
                   inverse RMS, weights = 3K fp32 values per token; the fused GPU kernel: logits and
                   inverse RMS, 2K + 1) and the q*g product; the routed term when an identity gate
                   multiplies it.
    sources        every source a sublayer of the stage routes over stays alive until backward: x_0
                   and the block deltas (delta_block), every sublayer output (delta, attnres_full), the
                   partial block sums (attnres_block). Found by walking the stage through the
                   model's own bookkeeping (each layer's `advance`, i.e. DepthState's updates, the
                   block's layer groups and entry state) on placeholders, so sources shared by
                   several sublayers count once.
    pipeline input the received [slots * s, b, h] message: its sources are views of it, so the whole
                   message is kept until the stage's backward. Interleaved PP: sources a rank keeps
                   for its next chunk count once, on the chunk that received or made them.
    mtp            multi-token prediction (last stage): per MTP layer the embedding of the rolled
                   tokens, enorm / hnorm, eh_proj's [s, b, 2h] input and TP-gathered output, one
                   unrouted transformer layer (dense or MoE), the final norm, its row of the output
                   layer's input and its own loss (fp32 softmax, loss mask, per-token loss); under
                   full (uniform) recompute only what its checkpoint keeps.
For the local backend (torch ops, as on CPU) the sum agrees to the byte with the saved-tensor bytes
of real runs (tests/test_plan.py: TP2+SP, recompute, PP2 for four variants, PP2 x VPP2, MTP on PP2,
TP2+SP and PP2 with full recompute, on megatron-core 0.16.1 and 0.19.2); MoE layers
(moe_mlp: router, the experts' MLPs on balanced routing, a shared expert) are an estimate; the
transformer_engine terms follow what TE's fused LayerNorm-linear and flash attention keep (input,
normalised input, inverse RMS; q, k, v, output, log-sum-exp) and cannot be measured without a GPU.

Micro-batches in flight: a stage holds the activations of every micro-batch whose forward has run and
whose backward has not. This is simulated with Megatron's own schedule tables: 1F1B holds min(pp - r, M)
micro-batches on pipeline rank r; the interleaved schedule holds (pp - r - 1) * 2 + (vpp - 1) * group + 1
model-chunk micro-batches (each 1/vpp of a stage), i.e. more.

Bytes per parameter, as `megatron-delta train` keeps them: bf16/fp16 weights (2), fp32 main gradients
(4, DDP grad_reduce_in_fp32), fp32 master weights + Adam exp_avg + exp_avg_sq (12), the last sharded
over data-parallel ranks by the distributed optimizer (expert parameters: over the expert-data-parallel
group, world / (pp x ep x expert tp), as Megatron-Core's get_megatron_optimizer builds a second
optimizer for them). fp32 runs: 4 + 4 + 8.

Not modelled (covered by --reserve-gb): CUDA context, NCCL and cuBLAS workspaces, allocator
fragmentation, DDP bucket padding, gradients of activations during backward.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

import torch

from megatron_delta import compat, mesh
from megatron_delta.config import DeltaConfigError
from megatron_delta.data import DataError, build_tokenizer
from megatron_delta.parameters import count_parameters, is_expert_parameter
from megatron_delta.run_config import RunConfig, RunConfigError, build_model_chunk, build_transformer_config
from megatron_delta.run_config import load_run_config, padded_vocab_size

GiB = 2**30
FP32 = 4


@dataclasses.dataclass
class StagePlan:
    """One pipeline rank (any of its TP / DP ranks). Bytes unless named otherwise."""

    pp_rank: int
    layers: list  # [(first, last)] 1-based global layer numbers, one pair per model chunk
    params: int
    routing_params: int
    expert_params: int  # of `params`: this rank's share of the experts (its EP rank's, ETP-split)
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    expert_optimizer_bytes: int  # of `optimizer_bytes`: the expert parameters' share
    activation_parts: dict  # per micro-batch, summed over the rank's chunks: part -> bytes
    activation_bytes_per_microbatch: int
    microbatches_in_flight: int  # model-chunk micro-batches at the peak
    activation_bytes: int  # at the peak of the schedule
    transient_bytes: int  # one-off buffers on top of the held activations (see _transient_bytes)
    send_bytes_per_microbatch: int  # forward message to the next stage (0 on the last)
    moe_layers: int
    moe_collective_bytes: dict  # per micro-batch, all MoE layers: "forward"/"backward" -> collective -> bytes
    total_bytes: int
    fits: bool


@dataclasses.dataclass
class Plan:
    config_path: str
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    ep: int
    etp: int
    expert_dp: int  # the expert-data-parallel group the distributed optimizer shards experts over
    dispatcher: str | None
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    precision: str
    backend: str
    variant: str
    vocab_size: int
    total_params: int
    routing_params: int
    expert_params: int  # of total_params
    gpu_memory_bytes: int
    reserve_bytes: int
    stages: list
    boundaries: list  # transport.boundary_bytes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# ---------------------------------------------------------------------------------------------
# Building a pipeline rank's chunks on the meta device


def _build_chunks(cfg: RunConfig, config, vocab_size: int) -> list:
    """This pipeline rank's DeltaGPTModel chunks as `megatron-delta train` builds them, on meta.

    Always the local layer spec: the transformer_engine spec has the same parameters (TE fuses the
    pre-norm weight into the following linear) and needs TE, which a planning host may not have."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    # The embedding group exists only to all-reduce the tied output weight at construction (and its
    # gradient later), which a meta tensor cannot take part in; nothing it does changes a count.
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    # Token dispatchers hold no parameters, and grouped-GEMM experts hold the same ones as
    # sequential experts; the alltoall dispatcher makes CUDA streams when built and grouped GEMM
    # needs its GPU library, which a planning host may not have.
    if config.num_moe_experts:
        config = dataclasses.replace(config, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        with torch.device("meta"):
            chunks.append(build_model_chunk(cfg, config, vocab_size, vp_stage=vp_stage if vpp else None,
                                            backend="local", pg_collection=groups))
    return chunks


# ---------------------------------------------------------------------------------------------
# Activations held for backward, per micro-batch


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Sizes on one TP rank for one micro-batch."""

    seq: int  # sequence length on this rank (divided by context parallelism)
    batch: int
    tokens: int  # seq * batch: tokens inside the tensor-parallel region (attention, MLP)
    sp_tokens: int  # tokens of the residual stream on this rank (tokens / tp under SP)
    hidden: int
    heads: int  # attention heads on this rank
    groups: int  # query groups (K/V heads) on this rank
    head_dim: int
    ffn: int  # MLP width on this rank
    vocab: int  # vocabulary rows on this rank
    elem: int  # bytes of an activation (params_dtype)
    pipe_elem: int  # bytes of a pipeline message element

    @classmethod
    def of(cls, config, seq_length: int, micro_batch_size: int, vocab_size: int):
        tp = config.tensor_model_parallel_size
        seq = seq_length // config.context_parallel_size
        tokens = seq * micro_batch_size
        return cls(
            seq=seq, batch=micro_batch_size, tokens=tokens,
            sp_tokens=tokens // tp if config.sequence_parallel else tokens,
            hidden=config.hidden_size, heads=config.num_attention_heads // tp,
            groups=(config.num_query_groups or config.num_attention_heads) // tp,
            head_dim=config.kv_channels, ffn=config.ffn_hidden_size // tp, vocab=vocab_size // tp,
            elem=_bytes(config.params_dtype), pipe_elem=_bytes(config.pipeline_dtype or config.params_dtype),
        )


def _bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ActivationModel:
    """Bytes autograd keeps per micro-batch, term by term. `backend` is the run's transformer_impl;
    `fused_routing` says whether routing runs the fused GPU kernel (kernels.py) or DepthRoute."""

    def __init__(self, config, shapes: _Shapes, backend: str, position_embedding_type: str,
                 create_attention_mask: bool, fused_routing: bool):
        self.config, self.s, self.backend = config, shapes, backend
        self.rope = position_embedding_type == "rope"
        self.create_attention_mask = create_attention_mask
        self.fused_routing = fused_routing
        self.stream_bytes = shapes.sp_tokens * shapes.hidden * shapes.elem  # one [s, b, h] tensor

    def norm_and_linear_input(self) -> int:
        """A pre-norm and the linear it feeds, without the norm's input (a stream tensor, counted by
        identity). Local: torch RMSNorm keeps x * rstd and rstd, the linear keeps the normed input;
        TE's fused LayerNorm-linear keeps the normed input and rstd. Under SP the linear keeps its
        local (not all-gathered) input."""
        s = self.s
        normed = s.sp_tokens * s.hidden * s.elem
        return (2 if self.backend == "local" else 1) * normed + s.sp_tokens * FP32

    def _recompute_core_attention(self) -> bool:
        c = self.config
        return c.recompute_granularity == "selective" and "core_attn" in c.recompute_modules

    def attention(self) -> int:
        """Core attention of one layer, RoPE, q/k norms and the output projection's input.

        q, k, v are views of the fused QKV output: whatever keeps v itself (flash attention, the
        selective-recompute checkpoint) or a norm's q / k input keeps that whole output alive."""
        s, c = self.s, self.config
        q = s.tokens * s.heads * s.head_dim * s.elem
        kv = s.tokens * s.groups * s.head_dim * s.elem
        fused_qkv = q + 2 * kv
        rope = 4 * s.seq * s.head_dim * s.elem if self.rope else 0  # cos and sin, for q and for k
        qk_norm = 0
        if c.qk_layernorm:  # rstd, and for torch RMSNorm (local) x * rstd; the inputs are views
            qk_norm = s.tokens * (s.heads + s.groups) * FP32 + (q + kv if self.backend == "local" else 0)
        if self.backend == "local":
            if self._recompute_core_attention():
                # The checkpoint keeps its inputs: rotated q and k, v (a view), the mask type
                # (an int32 tensor); then the context, the output projection's input.
                return rope + qk_norm + q + kv + fused_qkv + 4 + q
            # Unfused: q, k, v with K/V expanded to every head, the softmax output, the context.
            probs = s.batch * s.heads * s.seq * s.seq * s.elem
            dropout = s.batch * s.heads * s.seq * s.seq * (1 + s.elem) if c.attention_dropout > 0 else 0
            return rope + qk_norm + (fused_qkv if c.qk_layernorm else 0) + 3 * q + probs + dropout + q
        # Flash attention keeps rotated q and k, v (a view), its output (also the projection's
        # input) and the fp32 log-sum-exp per head and token (recomputed under selective recompute).
        lse = 0 if self._recompute_core_attention() else s.batch * s.heads * s.seq * FP32
        return rope + qk_norm + q + kv + fused_qkv + q + lse

    def mlp(self) -> int:
        """fc1 output, activation and fc2 input."""
        s, c = self.s, self.config
        if c.recompute_granularity == "selective" and "mlp" in c.recompute_modules:
            return 0
        width = s.tokens * s.ffn * s.elem
        if not c.gated_linear_unit:
            return 2 * width  # fc1 output (kept by GeLU) and GeLU output (kept by fc2)
        # Fused bias-SwiGLU keeps fc1's output [.., 2f] and fc2 keeps the product; unfused, torch
        # also keeps silu(a) and the `b + glu_linear_offset` copy.
        return (3 if c.bias_activation_fusion else 5) * width

    def moe_mlp(self) -> int:
        """An MoE MLP (estimate, routing-dependent; not measured): the router's fp32 scores and
        probabilities [tokens, experts] and top-k indices, the experts' MLPs on the tokens this
        rank's experts receive when routing is balanced (tokens x topk x expert TP, each expert's
        input kept, probabilities applied to its output), and the shared expert's dense MLP."""
        s, c = self.s, self.config
        if c.recompute_granularity == "selective" and "mlp" in c.recompute_modules:
            return 0
        router = s.sp_tokens * (2 * c.num_moe_experts * FP32 + c.moe_router_topk * 8)
        routed = s.sp_tokens * c.moe_router_topk * c.expert_tensor_parallel_size
        width = routed * (c.moe_ffn_hidden_size // c.expert_tensor_parallel_size) * s.elem
        experts = (3 if c.gated_linear_unit and c.bias_activation_fusion else 5 if c.gated_linear_unit else 2) * width
        experts += 2 * routed * s.hidden * s.elem + routed * s.elem  # expert inputs, outputs x probs
        shared = c.moe_shared_expert_intermediate_size or 0
        shared_mlp = self.mlp() * shared // c.ffn_hidden_size if shared else 0
        return router + experts + shared_mlp

    def layer(self, moe: bool = False) -> int:
        """One layer's own tensors, without its stream inputs and routing."""
        dropout = 2 * self.s.sp_tokens * self.s.hidden if self.config.hidden_dropout > 0 else 0
        mlp = self.moe_mlp() if moe else self.mlp()
        return 2 * self.norm_and_linear_input() + self.attention() + mlp + dropout

    def routing_call(self, num_sources: int, gated: bool) -> int:
        """What one route() call over `num_sources` sources keeps besides the sources."""
        s = self.s
        scalars = (2 * num_sources + 1) if self.fused_routing else 3 * num_sources
        return s.hidden * FP32 + scalars * s.sp_tokens * FP32 + (self.stream_bytes if gated else 0)

    def attention_mask(self) -> int:
        """The local backend's masked softmax keeps the mask: the data's [b, 1, s, s], or Megatron's
        cached causal [s, s]. Flash attention needs none."""
        if self.backend != "local" or (self._recompute_core_attention() and not self.create_attention_mask):
            return 0  # (the cached causal mask is made inside the recomputed region)
        s = self.s
        return (s.batch if self.create_attention_mask else 1) * s.seq * s.seq

    def embedding(self) -> int:
        """Token ids (int64) kept by the lookup (TP > 1: also the out-of-shard mask), and the
        position ids of learned absolute position embeddings."""
        tp = self.config.tensor_model_parallel_size
        return self.s.tokens * (8 + (1 if tp > 1 else 0) + (0 if self.rope else 8))

    def output_and_loss(self) -> int:
        """Final norm + output layer input, and the vocab-parallel cross entropy: fp32 softmax
        [tokens, vocab / tp], target mask (bool) and masked targets (int64)."""
        s = self.s
        return self.norm_and_linear_input() + s.tokens * s.vocab * FP32 + s.tokens * (1 + 8)

    def recompute_mtp(self) -> bool:
        """Whether MTP layers checkpoint themselves: Megatron's do under full recompute, uniform
        method (block: not implemented there, they run without)."""
        return self.config.recompute_granularity == "full" and self.config.recompute_method == "uniform"

    def mtp_layer(self, moe: bool) -> tuple[int, int]:
        """One of Megatron's MultiTokenPredictionLayers (last pipeline stage) with its share of
        GPTModel's MTP loss: (bytes kept per micro-batch, bytes recomputed in backward). It embeds
        the rolled tokens, normalises embedding (enorm) and hidden state (hnorm), projects their
        concatenation [s, b, 2h] with eh_proj (column-parallel: gathered over TP, scattered again
        under SP), runs one unrouted transformer layer and a final norm, whose output GPTModel
        concatenates to the decoder's along the sequence for the shared output layer and a cross
        entropy of its own. Under recompute_mtp() a checkpoint recomputes everything from the
        norms to the final norm; it keeps its inputs, the embedding and hidden state (and the
        rotary table and mask, counted once per stage in chunk_activations)."""
        s, stream = self.s, self.stream_bytes
        # The MTP loss: the cross entropy over its own logits, the rolled fp32 loss mask it is
        # multiplied by, the masked per-token loss (MTPLossAutoScaler) and the token-count scalars.
        loss = (self.output_and_loss() - self.norm_and_linear_input() + s.tokens * 2 * FP32
                + compat.mtp_loss_kept_scalars() * FP32)
        outside = self.embedding() + loss + stream * (
            1  # enorm's input: the embedding of the rolled tokens
            # hnorm's input and a row of the output layer's input: the output layer now keeps the
            # concatenated [(1 + mtp) s, b, h] instead of the decoder's output, which the first hnorm
            # keeps; later MTP layers' hnorms keep the previous MTP layer's output.
            + 2)
        # enorm, hnorm and the final norm: their outputs go into concatenations, which keep nothing.
        norm = self.norm_and_linear_input() - s.sp_tokens * s.hidden * s.elem
        # eh_proj's output gathered over TP, the transformer layer's input: under SP a slice of it
        # along the sequence, a view that keeps the whole gathered [s, b, h] alive.
        gathered = s.tokens * s.hidden * s.elem
        inside = 3 * norm + gathered + self.layer(moe) + stream * (
            2  # eh_proj's input, the concatenation [s, b, 2h] (SP: of the local sequence)
            + 1  # the pre-MLP norm's input (the layer's residual after attention)
            + 1)  # the final norm's input (the layer's output)
        return (outside, inside) if self.recompute_mtp() else (outside + inside, 0)


def moe_collective_bytes(config, s: _Shapes) -> dict:
    """What one MoE layer's token dispatcher hands to collectives on one rank per micro-batch,
    {"forward" | "backward": {collective: bytes}}: the output buffer of an all-gather, the input
    of a reduce-scatter and of an all-to-all (what crosses the network is (n - 1) / n of that in a
    group of n). The tokens a rank *receives* in an all-to-all depend on the routing: counted as
    balanced (dropless routing: over the EP group, received = sent = tokens x topk), which is the
    mean over ranks; everything else is exact.

    allgather (group: EP x expert TP, n ranks): forward all-gathers the routing map (bool), the
    probabilities and the tokens, and reduce-scatters the experts' output (in the probabilities'
    dtype); backward reduce-scatters the token and probability gradients and all-gathers the
    output's gradient.
    alltoall: forward all-gathers the tokens-per-expert counts (int64) over EP x expert TP, sends
    the permuted tokens (tokens x topk rows) and their probabilities to the experts' EP ranks and
    the experts' output back; backward sends the three gradients the other way. With expert TP > 1
    the received tokens and probabilities are also all-gathered, and the output reduce-scattered,
    over expert TP."""
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    n = ep * etp
    forward, backward = collections.Counter(), collections.Counter()
    if n == 1:
        return {"forward": {}, "backward": {}}
    tokens, h, e, experts, k = s.sp_tokens, s.hidden, s.elem, config.num_moe_experts, config.moe_router_topk
    pe = {"fp32": 4, "fp64": 8}.get(config.moe_router_dtype, e)  # the router's output dtype
    if config.moe_token_dispatcher_type == "allgather":
        forward["all-gather"] += n * tokens * (experts * (1 + pe) + h * e)
        forward["reduce-scatter"] += n * tokens * h * pe
        backward["reduce-scatter"] += n * tokens * (h * e + experts * pe)
        backward["all-gather"] += n * tokens * h * pe
    else:
        routed = tokens * k
        forward["all-gather"] += n * experts * 8
        forward["all-to-all"] += routed * (2 * h * e + pe)
        backward["all-to-all"] += routed * (2 * h * e + pe)
        if etp > 1:
            forward["all-gather"] += etp * routed * (h * e + pe)
            forward["reduce-scatter"] += etp * routed * h * pe
            backward["reduce-scatter"] += etp * routed * (h * e + pe)
            backward["all-gather"] += etp * routed * h * pe
    return {"forward": dict(forward), "backward": dict(backward)}


def _placeholder():
    return torch.empty((), device="meta")


def _walk_stream(block, delta, recompute_groups):
    """Which residual-stream tensors backward keeps, found by walking the stage through the
    model's own bookkeeping on placeholders: the block's entry state (transport.unpack) and layer
    groups, each layer's `advance` (DepthState: sublayer order, block closing), the hand-off to the
    rank's next chunk and the final router. The standard model keeps its plain residual stream.

    Returns ({"layer inputs": n, "sources": n} stream tensors created on this chunk and kept (the
    received ones live in the pipeline message), K of every kept route() call, K of every
    recomputed route() call per recompute group)."""
    from megatron_delta import transport
    from megatron_delta.state import DepthState

    # id -> (tensor, kind); holding the placeholders keeps their ids from being reused.
    kept, received = {}, {}

    def keep(kind, *tensors):
        for t in tensors:
            if kept.get(id(t), (None, None))[1] != "sources":
                kept[id(t)] = (t, kind)

    if not delta.routed:
        return _walk_plain_stream(block, recompute_groups)
    if block.pre_process:
        state = DepthState.start(block.rules, _placeholder())
    else:
        boundary, slots = block.boundary_in, block.pipeline_slots
        state = transport.unpack(torch.empty(slots, device="meta"), block.rules, boundary, slots,
                                 [_placeholder() for _ in range(boundary.kept)])
        received.update((id(t), t) for t in state.tensors())

    calls, recomputed = [], []
    for start, end, recompute in recompute_groups:
        group_calls = []
        if recompute:  # the checkpoint keeps its tensor inputs: the state entering the group
            keep("layer inputs", *state.tensors())

        def sublayer(state, index):
            """A sublayer's route() over state.route_sources() and its output v."""
            sources = state.route_sources()
            (group_calls if recompute else calls).append(len(sources))
            if not recompute:
                keep("sources", *sources)
                keep("layer inputs", _placeholder())  # h = x + r (or r): the pre-norm's input
            return _placeholder()

        for layer in block.layers[start:end]:
            state = layer.advance(state, sublayer)
        if recompute:
            recomputed.append(group_calls)
    if block.keeps_sources:  # held for the rank's next chunk until this one's backward
        keep("sources", *state.sources)
    if block.final_router is not None:
        calls.append(len(state.sources))
        keep("sources", *state.sources)
        keep("layer inputs", _placeholder())  # the final norm's input r
    elif block.post_process:
        keep("layer inputs", state.hidden)  # the final norm's input x
    counts = {"layer inputs": 0, "sources": 0}
    for key, (_, kind) in kept.items():
        if key not in received:
            counts[kind] += 1
    return counts, calls, recomputed


def _walk_plain_stream(block, recompute_groups):
    """_walk_stream for the standard model (Megatron's TransformerBlock): the input of every
    pre-norm outside recomputed groups, the input of every recomputed group and the final norm's
    input, less the received stream."""
    kept = sum(1 if recompute else 2 * (end - start) for start, end, recompute in recompute_groups)
    kept += 1 if block.post_process else 0
    kept -= 0 if block.pre_process else 1  # the first of them is the received message
    return {"layer inputs": kept, "sources": 0}, [], [[] for *_, recompute in recompute_groups if recompute]


def _layer_groups(block):
    """(start, end, recompute) over the chunk's layers: DeltaTransformerBlock's split, which is
    also how Megatron's TransformerBlock (the standard model's decoder) groups layers for full
    recompute."""
    from megatron_delta.block import DeltaTransformerBlock

    return DeltaTransformerBlock.layer_groups(block)


def is_moe_layer(layer) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(layer.mlp, MoELayer)


def _transformer_layer(mtp_layer):
    """An MTP layer's transformer layer (dense or MoE as the decoder's last layer), found by type:
    the attribute that holds it differs between releases."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return next(m for m in mtp_layer.modules() if isinstance(m, TransformerLayer))


def chunk_activations(chunk, delta, model: ActivationModel, slots: int) -> tuple[dict, int]:
    """({part: bytes} held per micro-batch, the largest one-off buffer: a recomputed layer group or
    a block's routed terms) of one chunk."""
    block = chunk.decoder
    groups = _layer_groups(block)
    kept_stream, calls, recomputed = _walk_stream(block, delta, groups)
    kept_layers = sum(end - start for start, end, recompute in groups if not recompute)
    gated = delta.has_gate
    s = model.s

    def layers(start, end):
        return sum(model.layer(moe=is_moe_layer(layer)) for layer in block.layers[start:end])

    mtp = [model.mtp_layer(moe=is_moe_layer(_transformer_layer(layer))) for layer in chunk.mtp.layers
           ] if chunk.mtp_process else []
    parts = {
        "layers": sum(layers(start, end) for start, end, recompute in groups if not recompute)
                  + (model.attention_mask() if kept_layers else 0),
        "layer inputs": kept_stream["layer inputs"] * model.stream_bytes,
        "sources": kept_stream["sources"] * model.stream_bytes,
        "routing": sum(model.routing_call(k, gated) for k in calls),
        "pipeline input": 0 if block.pre_process else slots * s.sp_tokens * s.hidden * s.pipe_elem,
        "embedding": model.embedding() if block.pre_process else 0,
        "output + loss": model.output_and_loss() if block.post_process else 0,
    }
    if model.config.mtp_num_layers:  # a column of its own, on every stage; 0 where there is no MTP block
        parts["mtp"] = sum(kept for kept, _ in mtp)
    if mtp and model.recompute_mtp():
        # The MTP layers' checkpoints also keep the rotary table (on a later stage the one sized for
        # the packed message, of which GPTModel hands on a view) and the data's mask, unless kept
        # decoder layers keep it already.
        mask_kept = kept_layers and model.attention_mask()
        parts["mtp"] += ((s.seq * (1 if block.pre_process else slots) * s.head_dim * FP32 if model.rope else 0)
                         + (s.batch * s.seq * s.seq if model.create_attention_mask and not mask_kept else 0))
    # Backward of a recomputed group runs its forward again: its layers' tensors, one group at a time.
    recomputed_groups = [(start, end) for start, end, recompute in groups if recompute]
    recompute_peak = max(
        [layers(start, end) + (end - start) * 2 * model.stream_bytes + model.attention_mask()
         + sum(model.routing_call(k, gated) for k in group_calls)
         for (start, end), group_calls in zip(recomputed_groups, recomputed)]
        + [again for _, again in mtp],  # an MTP layer under recompute_mtp()
        default=0,
    )
    # delta_block routes the sublayers of a block (as far as it lies in one layer group) in one
    # pass: their routed terms exist together while the block's layers run.
    routed_ahead = max([2 * len(run) * model.stream_bytes for start, end, _ in groups
                        for run in block.routing_runs(block.layers[start:end])],
                       default=0) if delta.block_sources_fixed else 0
    return parts, max(recompute_peak, routed_ahead)


# ---------------------------------------------------------------------------------------------
# Schedule


def _in_flight(chunk_bytes: list, num_microbatches: int, config) -> tuple[int, int]:
    """(peak bytes, model-chunk micro-batches in flight at that peak) on this pipeline rank, by
    replaying the order in which Megatron's schedule runs forwards and backwards."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    num_chunks = len(chunk_bytes)
    group = config.microbatch_group_size_per_vp_stage
    total, _, warmup, remaining = get_pp_rank_microbatches(num_microbatches, num_chunks, group)
    forward = [chunk for _, chunk in get_schedule_table(num_microbatches, num_chunks, group)]
    backward = [num_chunks - 1 - chunk for chunk in forward]
    live, count, peak, peak_count = 0, 0, 0, 0
    steps = ["F"] * warmup + ["F", "B"] * remaining + ["B"] * (total - remaining)
    f = b = 0
    for step in steps:
        if step == "F":
            live, count, f = live + chunk_bytes[forward[f]], count + 1, f + 1
            if live > peak:
                peak, peak_count = live, count
        else:
            live, count, b = live - chunk_bytes[backward[b]], count - 1, b + 1
    return peak, peak_count


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0,
              reserve_gb: float = 8.0, on_gpu: bool = True, config_path: str = "") -> Plan:
    """The plan of `cfg` on nodes x gpus_per_node GPUs. on_gpu=False plans the run as
    `megatron-delta train` runs it without a GPU (fp32, unfused kernels, DepthRoute)."""
    from megatron_delta import transport

    world = nodes * gpus_per_node
    cfg.validate(world)
    # Weights are "initialised" on meta (no memory, no work): Megatron marks TP-sharded weights
    # (`tensor_model_parallel`) in its init functions, so they must run.
    config = dataclasses.replace(build_transformer_config(cfg, on_gpu=on_gpu), use_cpu_initialization=True)
    vocab = padded_vocab_size(cfg, None if cfg.model.vocab_size else build_tokenizer(cfg.data).vocab_size)
    tp, pp, vpp = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                   config.virtual_pipeline_model_parallel_size)
    dp = cfg.data_parallel_size(world)
    t, delta = cfg.training, cfg.delta
    micro = cfg.num_microbatches(world)
    shapes = _Shapes.of(config, cfg.model.seq_length, t.micro_batch_size, vocab)
    model = ActivationModel(config, shapes, cfg.model.transformer_impl, cfg.model.position_embedding_type,
                            cfg.data.create_attention_mask, fused_routing=on_gpu)
    boundaries = transport.boundary_bytes(delta, config, cfg.model.seq_length, t.micro_batch_size)
    slots = transport.pipeline_slots(delta, config)

    mixed = config.bf16 or config.fp16
    weight_per_param = _bytes(config.params_dtype)
    grad_per_param = FP32 if mixed else weight_per_param
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    # Megatron's expert mesh: EP x expert TP x PP, the rest is the expert-data-parallel group, over
    # which the distributed optimizer shards expert parameters (dense ones: over DP).
    expert_dp = world // (pp * ep * etp)
    sharded = cfg.parallel.use_distributed_optimizer
    optimizer_per_param = (3 if mixed else 2) * FP32
    moe_layer_bytes = moe_collective_bytes(config, shapes) if config.num_moe_experts else None

    stages, total_params, routing_params, total_expert_params = [], 0, 0, 0
    for pp_rank in range(pp):
        with mesh.planning_rank(config, pp_rank):
            chunks = _build_chunks(cfg, config, vocab)
            params = sum(p.numel() for c in chunks for p in c.parameters())
            expert_params = sum(p.numel() for c in chunks for p in c.parameters() if is_expert_parameter(p))
            stage_total, routing, stage_experts = count_parameters(chunks, tp, ep, etp)
            total_params += stage_total
            total_expert_params += stage_experts
            routing_params += routing
            moe_layers = (sum(is_moe_layer(layer) for c in chunks for layer in c.decoder.layers)
                          + sum(is_moe_layer(_transformer_layer(layer)) for c in chunks if c.mtp_process
                                for layer in c.mtp.layers))
            per_chunk = [chunk_activations(c, delta, model, slots) for c in chunks]
            chunk_bytes = [sum(parts.values()) for parts, _ in per_chunk]
            peak, in_flight = _in_flight(chunk_bytes, micro, config)
            layers = [(c.decoder.layers[0].layer_number, c.decoder.layers[-1].layer_number) for c in chunks]
            post_process = chunks[-1].post_process
        parts = {key: sum(p[key] for p, _ in per_chunk) for key in per_chunk[0][0]}
        # The loss turns the logits into fp32: both copies of one micro-batch exist for a moment.
        # MTP layers do the same for their own logits, one after another and before the decoder's
        # (what each loss keeps, counted in "mtp", is held already), so the peak is still one copy.
        logits_copy = shapes.tokens * shapes.vocab * shapes.elem if post_process and shapes.elem != FP32 else 0
        transient = max([logits_copy] + [r for _, r in per_chunk])
        sends = [b["sent_bytes"] for i, b in enumerate(boundaries) if i % pp == pp_rank]
        weights, grads = params * weight_per_param, params * grad_per_param
        dense_optimizer = (params - expert_params) * optimizer_per_param // (dp if sharded else 1)
        expert_optimizer = expert_params * optimizer_per_param // (expert_dp if sharded else 1)
        optimizer = dense_optimizer + expert_optimizer
        collectives = {direction: {name: moe_layers * n for name, n in per_layer.items()}
                       for direction, per_layer in (moe_layer_bytes or {}).items()}
        total = weights + grads + optimizer + peak + transient
        stages.append(StagePlan(
            pp_rank=pp_rank, layers=layers, params=params, routing_params=routing, expert_params=expert_params,
            weight_bytes=weights, grad_bytes=grads, optimizer_bytes=optimizer, expert_optimizer_bytes=expert_optimizer,
            activation_parts=parts,
            activation_bytes_per_microbatch=sum(chunk_bytes), microbatches_in_flight=in_flight,
            activation_bytes=peak, transient_bytes=transient, send_bytes_per_microbatch=max(sends, default=0),
            moe_layers=moe_layers, moe_collective_bytes=collectives, total_bytes=total,
            fits=total <= (gpu_memory_gb - reserve_gb) * GiB,
        ))
    return Plan(
        config_path=config_path, nodes=nodes, gpus_per_node=gpus_per_node, tp=tp, pp=pp, vpp=vpp, dp=dp,
        sequence_parallel=config.sequence_parallel, distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ep=ep, etp=etp, expert_dp=expert_dp,
        dispatcher=config.moe_token_dispatcher_type if config.num_moe_experts else None,
        num_microbatches=micro, micro_batch_size=t.micro_batch_size, seq_length=cfg.model.seq_length,
        precision=t.precision if on_gpu else "fp32", backend=cfg.model.transformer_impl, variant=delta.variant,
        vocab_size=vocab, total_params=total_params, routing_params=routing_params, expert_params=total_expert_params,
        gpu_memory_bytes=int(gpu_memory_gb * GiB), reserve_bytes=int(reserve_gb * GiB), stages=stages,
        boundaries=boundaries,
    )


# ---------------------------------------------------------------------------------------------
# Output


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _moe_summary(plan: Plan, m) -> list:
    """The model line's MoE continuation: experts, MoE layers, expert and active parameters
    (active: all but the (experts - topk) / experts share of the expert weights a token skips)."""
    if not plan.dispatcher:
        return []
    shared = m.moe_shared_expert_intermediate_size
    skipped = plan.expert_params * (m.num_moe_experts - m.moe_router_topk) // m.num_moe_experts
    return [f"        {m.num_moe_experts} experts, top-{m.moe_router_topk}, expert ffn "
            f"{m.moe_ffn_hidden_size or m.ffn_hidden_size}{f', shared expert ffn {shared}' if shared else ''}, "
            f"{sum(s.moe_layers for s in plan.stages)} MoE layers: {plan.expert_params:,} expert parameters, "
            f"{plan.total_params - skipped:,} active per token"]


def format_plan(plan: Plan, cfg: RunConfig) -> str:
    m, d = cfg.model, cfg.delta
    schedule = ("no pipeline" if plan.pp == 1 else
                f"interleaved 1F1B, {plan.vpp} chunks per rank" if plan.vpp else "1F1B")
    variant = d.variant + (f" ({d.num_blocks} blocks)" if d.uses_blocks else "")
    layout = (f"TP {plan.tp}{' + SP' if plan.sequence_parallel else ''} x PP {plan.pp}"
              f"{f' (VPP {plan.vpp})' if plan.vpp else ''} x DP {plan.dp}"
              f"{', distributed optimizer' if plan.distributed_optimizer else ''}")
    if plan.dispatcher:
        layout += (f"; experts: EP {plan.ep} x expert TP {plan.etp} x expert DP {plan.expert_dp}, "
                   f"{plan.dispatcher} dispatcher")
    head = [
        f"megatron-delta plan: {plan.config_path or 'config'} on {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s)"
        f" = {plan.nodes * plan.gpus_per_node} ranks, {plan.gpu_memory_bytes / GiB:g} GiB per GPU",
        f"model   {variant}, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
        f"{m.num_query_groups or m.num_attention_heads} query groups, ffn {m.ffn_hidden_size or 4 * m.hidden_size}, "
        f"vocab {plan.vocab_size:,}: {plan.total_params:,} parameters ({plan.routing_params:,} routing)",
        *_moe_summary(plan, m),
        f"layout  {layout}; {plan.precision}, {plan.backend}",
        f"batch   micro-batch {plan.micro_batch_size} x {plan.seq_length} tokens, {plan.num_microbatches} "
        f"micro-batch(es) per step and DP rank, {schedule}",
        "",
    ]
    rows = []
    for s in plan.stages:
        layers = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in s.layers)
        rows.append([
            s.pp_rank, layers, f"{s.params / 1e6:,.1f}M",
            *([f"{s.expert_params / 1e6:,.1f}M"] if plan.dispatcher else []), _gib(s.weight_bytes), _gib(s.grad_bytes),
            _gib(s.optimizer_bytes), _gib(s.activation_bytes_per_microbatch), s.microbatches_in_flight,
            _gib(s.activation_bytes), _gib(s.transient_bytes), _gib(s.total_bytes),
            _mib(s.send_bytes_per_microbatch) if s.send_bytes_per_microbatch else "-",
            "yes" if s.fits else "NO",
        ])
    memory = _table(["pp rank", "layers", "params", *(["of which expert"] if plan.dispatcher else []),
                     "weights", "grads", "optimizer", "act/µb", "µb in flight",
                     "activations", "transient", "total GiB", "sends MiB/µb", "fits"], rows)
    part_names = list(plan.stages[0].activation_parts)
    parts = _table(["pp rank"] + part_names + ["per µb"],
                   [[s.pp_rank] + [_mib(s.activation_parts[k]) for k in part_names]
                    + [_mib(s.activation_bytes_per_microbatch)] for s in plan.stages])
    usable = (plan.gpu_memory_bytes - plan.reserve_bytes) / GiB
    notes = [
        "",
        "Activations per micro-batch by part, MiB. layers: tensors inside attention and MLP; layer inputs:",
        "the [s, b, h] inputs of the pre-norms (and of recomputed layer groups); sources: routing sources",
        "created on this rank and kept for backward; routing: per-token routing scalars; pipeline input:",
        "the received message, which holds the sources of earlier stages" + (";" if "mtp" in part_names else ":"),
        *(["mtp: the multi-token-prediction layers and their losses (last stage):"] if "mtp" in part_names else []),
        parts,
        "",
        f"fits: total <= {usable:g} GiB ({plan.gpu_memory_bytes / GiB:g} GiB minus {plan.reserve_bytes / GiB:g} GiB "
        "reserved for CUDA context, NCCL/cuBLAS workspaces and fragmentation).",
        "µb in flight: model-chunk micro-batches whose activations are held at the schedule's peak "
        "(1F1B: min(pp - rank, micro-batches); interleaved: more, each 1/vpp of a rank's layers).",
        "transient: the fp32 copy of one micro-batch's logits (last stage), one recomputed layer group, or",
        "the routed terms of one block (delta_block routes a block's sublayers in one pass).",
    ]
    if plan.dispatcher:
        notes += ["params: on one GPU of the stage (its TP shard of the dense weights, its EP rank's experts, "
                  "split over expert TP);",
                  f"optimizer: dense parameters sharded over DP {plan.dp}, expert parameters over expert DP "
                  f"{plan.expert_dp}." if plan.distributed_optimizer else "optimizer: not sharded.",
                  "", format_moe_traffic(plan)]
    if plan.boundaries:
        notes.append(f"sends: one [{max(b['tensors'] for b in plan.boundaries)} x s, b, h] message per micro-batch "
                     "forward, and its gradient back (transport.boundary_bytes).")
        notes += ["", "Pipeline traffic per micro-batch and hop, forward (the gradients come back the same size):",
                  format_hops(plan.boundaries)]
    return "\n".join(head + [memory] + notes)


def format_moe_traffic(plan: Plan) -> str:
    """The token dispatcher's collectives per micro-batch on one GPU (moe_collective_bytes)."""
    columns = [(d, n) for d in ("forward", "backward")
               for n in sorted({n for s in plan.stages for n in s.moe_collective_bytes.get(d, {})})]
    rows = [[s.pp_rank, s.moe_layers] + [_mib(s.moe_collective_bytes[d].get(n, 0)) for d, n in columns]
            for s in plan.stages]
    header = ["pp rank", "MoE layers"] + [f"{n} {'fwd' if d == 'forward' else 'bwd'}" for d, n in columns]
    return "\n".join([
        f"MoE dispatcher traffic per micro-batch and GPU, MiB, all MoE layers of the stage ({plan.dispatcher}):",
        "all-gather output, reduce-scatter input, all-to-all input (the network carries (n - 1) / n of",
        "it in a group of n); what an all-to-all rank receives depends on the routing and is counted balanced.",
        _table(header, rows)])


def format_hops(boundaries: list) -> str:
    """Per hop of the pipeline ring: messages, the tensors that cross (sources a rank kept from its
    previous chunk do not), MiB sent (padded to the message shape), and what a transport that
    re-sent every source at every boundary would send."""
    hops = {}
    for b in boundaries:
        hops.setdefault(tuple(b["hop"]), []).append(b)
    slot = boundaries[0]["sent_bytes"] // max(b["tensors"] for b in boundaries)
    resend = max(b["state_tensors"] for b in boundaries) * slot
    rows = [[f"{a} -> {z}", len(bs), " + ".join(str(b["tensors"]) for b in bs),
             " + ".join(str(b["state_tensors"]) for b in bs), _mib(sum(b["sent_bytes"] for b in bs)),
             _mib(len(bs) * resend)]
            for (a, z), bs in sorted(hops.items())]
    return _table(["hop", "messages", "tensors", "re-sending all", "MiB sent", "MiB re-sending all"], rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-delta plan",
        description="Per-rank parameters, memory and pipeline traffic of a run config on a cluster.")
    parser.add_argument("--config", required=True, help="run config YAML (as for megatron-delta train)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="device memory per GPU in GiB (default 80; an H100 80GB has 79.6)")
    parser.add_argument("--reserve-gb", type=float, default=8.0,
                        help="GiB per GPU left for what the plan does not model (default 8)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), as for megatron-delta train")
    parser.add_argument("--cpu", action="store_true",
                        help="plan the run as it runs without a GPU (fp32, unfused kernels): to compare with CPU runs")
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpu_memory_gb <= args.reserve_gb:
        parser.error(f"--gpu-memory-gb={args.gpu_memory_gb:g} must exceed --reserve-gb={args.reserve_gb:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_run_config(args.config, args.set)
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.reserve_gb,
                         on_gpu=not args.cpu, config_path=args.config)
    except (RunConfigError, DeltaConfigError, DataError, OSError) as e:
        print(f"megatron-delta plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(plan.to_json())
    return 0


if __name__ == "__main__":  # through the CLI, which checks the megatron-core release first
    from megatron_delta import cli

    sys.exit(cli.main(["plan", *sys.argv[1:]]))
