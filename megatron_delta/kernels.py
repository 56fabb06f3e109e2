"""Fused Triton kernels for depth routing (forward and backward), used on GPU.

Same math as routing.DepthRoute, for M queries over the same K sources at once:

    logit[m, i] = (w_m . s_i) * inv_rms(s_i)      w_m = query_m * key_norm_weight_m  (fp32)
    alpha[m]    = softmax_i(logit[m])             fp32
    routed[m]   = sum_i alpha[m, i] * s_i  (+ residual, for M = 1)

M = 1 is one sublayer's route (routing.route dispatches here on GPU). M > 1 is `route_block`:
inside a delta_block block the sources are fixed and the queries are static vectors, so the
routed inputs of all of the block's sublayers can be computed in one pass over the sources.

Memory: like DepthRoute, only the sources (which exist anyway) and per-token scalars are saved
for backward (logits [M, K, T], log-sum-exp [M, T], inverse RMS [K, T]); nothing of size K x T x h.

Kernels (T tokens = rows of h; the K sources are passed as a device array of their addresses,
so K is a runtime value and no stacked copy of the sources is ever made):
    _route_forward_kernel         one program per (token, query): a single pass over the K
                                  sources with an online softmax; the programs of one token
                                  are adjacent, so with M > 1 the other queries re-read the
                                  token's sources from cache, not HBM
    _route_backward_scalars_kernel  one program per token: d loss / d logit (softmax backward
                                  needs all K dot products g . s_i before any source gradient)
    _route_backward_tiles_kernel  one program per (chunk of tokens, tile of h): the source
                                  gradients, and per-chunk partial sums of the weight gradient
Backward therefore reads the sources twice; the second read cannot be avoided without keeping
K rows on chip or saving the routed output (an extra [T, h] activation).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the reference path (DepthRoute) is used
    HAVE_TRITON = False

# Set to 0 to force the reference path on GPU (A/B comparisons, debugging).
DISABLE_ENV = "MEGATRON_DELTA_FUSED_ROUTING"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Upper bound on the fp32 scratch that holds per-chunk partial sums of the weight gradient.
_PARTIAL_GRAD_ELEMENTS = 2**20


def enabled() -> bool:
    """Whether this machine runs the fused kernels: Triton importable, CUDA present, and not
    disabled by MEGATRON_DELTA_FUSED_ROUTING=0. Asked once, when a router is built."""
    return HAVE_TRITON and torch.cuda.is_available() and os.environ.get(DISABLE_ENV, "1") != "0"


def supports(tensors) -> bool:
    """Whether the kernels take these inputs: CUDA tensors of one kernel dtype and one shape,
    contiguous (fp64 sources, say, take the reference path)."""
    first = tensors[0]
    return (
        HAVE_TRITON
        and first.is_cuda
        and first.dtype in KERNEL_DTYPES
        and all(t.shape == first.shape and t.dtype == first.dtype and t.device == first.device
                and t.is_contiguous() for t in tensors)
    )


def fused_route(sources, weight, eps, residual=None):
    """One sublayer's route on the fused kernel: (routed [..., h] (+ residual), alpha [K, ...]).

    weight: [h] fp32, query * key-norm weight. residual, if given, is added in fp32 before the
    single rounding to the sources' dtype (h = x + r for the additive variants)."""
    routed, alpha = FusedDepthRoute.apply(weight.unsqueeze(0), eps, residual, *sources)
    return routed[0], alpha[0]


def route_block(sources, weights, eps):
    """Route M sublayers over the same sources in one pass: (routed: M tensors [..., h] in the
    sources' dtype, alpha [M, K, ...] fp32, not differentiable).

    weights: [M, h] fp32, row m = query_m * key_norm_weight_m."""
    routed, alpha = FusedDepthRoute.apply(weights, eps, None, *sources)
    return routed.unbind(0), alpha


class FusedDepthRoute(torch.autograd.Function):
    """routed [M, ..., h], alpha [M, K, ...] = FusedDepthRoute.apply(weights [M, h] fp32, eps,
    residual (or None; only with M = 1), *sources)."""

    @staticmethod
    def forward(ctx, weights, eps, residual, *sources):
        if weights.dtype != torch.float32:
            raise TypeError(f"fused routing accumulates in fp32; got weights of dtype {weights.dtype}")
        if residual is not None and weights.shape[0] != 1:
            raise ValueError("a fused residual add needs a single query (M = 1)")
        first = sources[0]
        num_queries, num_sources, hidden = weights.shape[0], len(sources), first.shape[-1]
        num_tokens = first.numel() // hidden
        device = first.device
        out = torch.empty((num_queries, *first.shape), dtype=first.dtype, device=device)
        logits = torch.empty((num_queries, num_sources, num_tokens), dtype=torch.float32, device=device)
        lse = torch.empty((num_queries, num_tokens), dtype=torch.float32, device=device)
        inv_rms = torch.empty((num_sources, num_tokens), dtype=torch.float32, device=device)
        block_h = triton.next_power_of_2(hidden)
        _route_forward_kernel[(num_tokens * num_queries,)](
            _addresses(sources), first, weights.contiguous(), residual, out, logits, lse, inv_rms,
            num_tokens, hidden, num_sources, num_queries, eps,
            BLOCK_H=block_h, num_warps=_num_warps(block_h),
        )
        ctx.save_for_backward(weights, logits, lse, inv_rms, *sources)
        ctx.has_residual = residual is not None
        alpha = torch.exp(logits - lse.unsqueeze(1)).view(num_queries, num_sources, *first.shape[:-1])
        ctx.mark_non_differentiable(alpha)
        return out, alpha

    @staticmethod
    def backward(ctx, grad_out, _grad_alpha):
        weights, logits, lse, inv_rms, *sources = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        first = sources[0]
        num_queries, num_sources, hidden = weights.shape[0], len(sources), first.shape[-1]
        num_tokens = first.numel() // hidden
        block_h = triton.next_power_of_2(hidden)

        # scale[m, i, t] = d loss / d logit[m, i, t] * inv_rms[i, t]
        scale = torch.empty_like(logits)
        _route_backward_scalars_kernel[(num_tokens,)](
            _addresses(sources), first, grad_out, logits, lse, inv_rms, scale,
            num_tokens, hidden, num_sources, num_queries,
            BLOCK_H=block_h, BLOCK_K=triton.next_power_of_2(num_sources), num_warps=_num_warps(block_h),
        )

        grad_sources = [torch.empty_like(s) for s in sources]
        block_m = triton.next_power_of_2(num_queries)
        tile_h = min(block_h, max(32, 2048 // block_m))
        num_chunks = max(1, min(num_tokens, _PARTIAL_GRAD_ELEMENTS // (num_queries * hidden)))
        rows_per_chunk = triton.cdiv(num_tokens, num_chunks)
        num_chunks = triton.cdiv(num_tokens, rows_per_chunk)
        partial_grad_weights = torch.empty((num_chunks, num_queries, hidden), dtype=torch.float32,
                                           device=first.device)
        _route_backward_tiles_kernel[(num_chunks, triton.cdiv(hidden, tile_h))](
            _addresses(sources), first, _addresses(grad_sources), weights.contiguous(), grad_out,
            logits, lse, inv_rms, scale, partial_grad_weights,
            num_tokens, hidden, num_sources, num_queries, rows_per_chunk,
            BLOCK_M=block_m, TILE_H=tile_h, num_warps=_num_warps(block_m * tile_h),
        )
        grad_residual = grad_out[0] if ctx.has_residual else None
        return (partial_grad_weights.sum(0), None, grad_residual, *grad_sources)


def _addresses(tensors):
    """The tensors' device addresses, as the int64 array the kernels index by source. Staged in
    pinned memory and copied asynchronously: a pageable copy would synchronise with the GPU."""
    device = tensors[0].device
    addresses = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, pin_memory=device.type == "cuda")
    return addresses.to(device, non_blocking=True)


def _num_warps(block_elements):
    # About 16 fp32 elements of a row block per thread (4 warps for h <= 2048, 8 for 4096), as
    # Triton's row-wise norm kernels; not tuned on hardware (no GPU was available).
    return max(1, min(16, block_elements // 512))


if HAVE_TRITON:

    @triton.jit
    def _route_forward_kernel(
        source_addresses, first_source, weights, residual, out, logits, lse, inv_rms,
        num_tokens, hidden, num_sources, num_queries, eps,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        token = pid // num_queries
        query = pid % num_queries
        cols = tl.arange(0, BLOCK_H)
        in_row = cols < hidden
        row = token.to(tl.int64) * hidden
        w = tl.load(weights + query * hidden + cols, mask=in_row, other=0.0)

        # Online softmax: one read of each source, the weighted sum rescaled as the max moves.
        running_max = float("-inf")
        denominator = 0.0
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(num_sources):
            source = tl.load(source_addresses + i).to(first_source.dtype)
            s = tl.load(source + row + cols, mask=in_row, other=0.0).to(tl.float32)
            source_inv_rms = tl.rsqrt(tl.sum(s * s) / hidden + eps)
            logit = tl.sum(s * w) * source_inv_rms
            new_max = tl.maximum(running_max, logit)
            rescale = tl.exp(running_max - new_max)
            p = tl.exp(logit - new_max)
            acc = acc * rescale + p * s
            denominator = denominator * rescale + p
            running_max = new_max
            tl.store(logits + (query * num_sources + i) * num_tokens + token, logit)
            tl.store(inv_rms + i * num_tokens + token, source_inv_rms, mask=query == 0)

        routed = acc / denominator
        if residual is not None:
            routed += tl.load(residual + row + cols, mask=in_row, other=0.0).to(tl.float32)
        out_row = (query * num_tokens + token).to(tl.int64) * hidden
        tl.store(out + out_row + cols, routed.to(out.dtype.element_ty), mask=in_row)
        tl.store(lse + query * num_tokens + token, running_max + tl.log(denominator))

    @triton.jit
    def _route_backward_scalars_kernel(
        source_addresses, first_source, grad_out, logits, lse, inv_rms, scale,
        num_tokens, hidden, num_sources, num_queries,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        token = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        in_row = cols < hidden
        row = token.to(tl.int64) * hidden
        source_ids = tl.arange(0, BLOCK_K)
        is_source = source_ids < num_sources
        token_inv_rms = tl.load(inv_rms + source_ids * num_tokens + token, mask=is_source, other=0.0)
        for query in range(num_queries):
            g = tl.load(grad_out + (query * num_tokens + token).to(tl.int64) * hidden + cols,
                        mask=in_row, other=0.0).to(tl.float32)
            # d loss / d alpha_i = g . s_i, gathered into a [BLOCK_K] vector (kept in registers:
            # the softmax backward needs all of them before any d loss / d logit).
            grad_alpha = tl.zeros([BLOCK_K], dtype=tl.float32)
            for i in range(num_sources):
                source = tl.load(source_addresses + i).to(first_source.dtype)
                s = tl.load(source + row + cols, mask=in_row, other=0.0).to(tl.float32)
                grad_alpha = tl.where(source_ids == i, tl.sum(g * s), grad_alpha)
            offsets = (query * num_sources + source_ids) * num_tokens + token
            logit = tl.load(logits + offsets, mask=is_source, other=float("-inf"))
            alpha = tl.exp(logit - tl.load(lse + query * num_tokens + token))
            grad_logit = alpha * (grad_alpha - tl.sum(alpha * grad_alpha))
            tl.store(scale + offsets, grad_logit * token_inv_rms, mask=is_source)

    @triton.jit
    def _route_backward_tiles_kernel(
        source_addresses, first_source, grad_source_addresses, weights, grad_out,
        logits, lse, inv_rms, scale, partial_grad_weights,
        num_tokens, hidden, num_sources, num_queries, rows_per_chunk,
        BLOCK_M: tl.constexpr, TILE_H: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * TILE_H + tl.arange(0, TILE_H)
        in_row = cols < hidden
        queries = tl.arange(0, BLOCK_M)
        is_query = queries < num_queries
        tile_mask = is_query[:, None] & in_row[None, :]
        w = tl.load(weights + queries[:, None] * hidden + cols[None, :], mask=tile_mask, other=0.0)
        grad_w = tl.zeros([BLOCK_M, TILE_H], dtype=tl.float32)
        first_token = chunk.to(tl.int64) * rows_per_chunk  # int64: token * hidden may pass 2**31
        for token in range(first_token, tl.minimum(first_token + rows_per_chunk, num_tokens)):
            row = token * hidden
            g = tl.load(grad_out + (queries[:, None] * num_tokens + token) * hidden + cols[None, :],
                        mask=tile_mask, other=0.0).to(tl.float32)
            token_lse = tl.load(lse + queries * num_tokens + token, mask=is_query, other=0.0)
            for i in range(num_sources):
                offsets = (queries * num_sources + i) * num_tokens + token
                logit = tl.load(logits + offsets, mask=is_query, other=0.0)
                alpha = tl.where(is_query, tl.exp(logit - token_lse), 0.0)
                source_scale = tl.load(scale + offsets, mask=is_query, other=0.0)
                source = tl.load(source_addresses + i).to(first_source.dtype)
                s = tl.load(source + row + cols, mask=in_row, other=0.0).to(tl.float32)
                # logit = (w . s) * inv_rms(s), d inv_rms / d s = -inv_rms^3 s / h, so
                # d loss / d s = sum_m alpha_m g_m + scale_m (w_m - logit_m inv_rms s / h)
                rms_coefficient = tl.sum(source_scale * logit) * tl.load(inv_rms + i * num_tokens + token) / hidden
                grad = (tl.sum(alpha[:, None] * g, axis=0) + tl.sum(source_scale[:, None] * w, axis=0)
                        - rms_coefficient * s)
                grad_source = tl.load(grad_source_addresses + i).to(first_source.dtype)
                tl.store(grad_source + row + cols, grad.to(first_source.dtype.element_ty), mask=in_row)
                grad_w += source_scale[:, None] * s[None, :]
        partial_offsets = (chunk * num_queries + queries[:, None]).to(tl.int64) * hidden + cols[None, :]
        tl.store(partial_grad_weights + partial_offsets, grad_w, mask=tile_mask)
