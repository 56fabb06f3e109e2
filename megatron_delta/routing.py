"""Depth routing: r = sum_i softmax_i(q . RMSNorm_g(s_i)) s_i, one call per sublayer input.

Because q . (g * s / rms(s)) = ((q * g) . s) / rms(s), the logits need only two per-token
scalars per source (a dot product and the inverse RMS): the normalised keys are never built.
`DepthRoute` saves the sources themselves (they already exist for the rest of the network)
plus those per-token scalars, so routing over K sources never keeps a stacked K x [s, b, h]
copy for backward. Softmax, logits and the weighted sum accumulate in fp32 whatever the
model dtype; the routed term comes back in the sources' dtype.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from megatron_delta import kernels


class DepthRoute(torch.autograd.Function):
    """routed, alpha = DepthRoute.apply(weight, eps, *sources).

    weight: [h], the product query * key-norm weight, in the accumulation dtype (fp32, or fp64
    for fp64 sources); sources: K tensors [..., h]. alpha: [K, ...] routing weights in the
    accumulation dtype (not differentiable; for diagnostics).
    """

    @staticmethod
    def forward(ctx, weight, eps, *sources):
        acc = weight.dtype
        dot = torch.stack([s.to(acc) @ weight for s in sources])
        rstd = torch.stack([torch.rsqrt(s.to(acc).pow(2).mean(-1) + eps) for s in sources])
        alpha = torch.softmax(dot * rstd, dim=0)
        routed = torch.zeros(sources[0].shape, dtype=acc, device=sources[0].device)
        for a, s in zip(alpha, sources):
            routed.addcmul_(a.unsqueeze(-1), s.to(acc))
        ctx.save_for_backward(weight, dot, rstd, alpha, *sources)
        ctx.mark_non_differentiable(alpha)
        return routed.to(sources[0].dtype), alpha

    @staticmethod
    def backward(ctx, grad_routed, _grad_alpha):
        weight, dot, rstd, alpha, *sources = ctx.saved_tensors
        hidden, acc = weight.numel(), weight.dtype
        grad = grad_routed.to(acc)
        # d loss / d alpha_i = grad . s_i, then back through the softmax over depth.
        grad_alpha = torch.stack([(grad * s.to(acc)).sum(-1) for s in sources])
        grad_logit = alpha * (grad_alpha - (alpha * grad_alpha).sum(0, keepdim=True))
        grad_weight = torch.zeros_like(weight)
        grad_sources = []
        for i, s in enumerate(sources):
            s_acc = s.to(acc)
            # logit_i = rstd_i * (s_i . w);  d rstd_i / d s_i = -rstd_i^3 s_i / h
            scale = (grad_logit[i] * rstd[i]).unsqueeze(-1)
            grad_s = alpha[i].unsqueeze(-1) * grad + scale * weight
            grad_s -= (scale * (dot[i] * rstd[i].square()).unsqueeze(-1) / hidden) * s_acc
            grad_sources.append(grad_s.to(s.dtype))
            grad_weight += (scale * s_acc).reshape(-1, hidden).sum(0)
        return (grad_weight, None, *grad_sources)


def routing_weight(query, key_norm_weight, sources):
    """q * g in the accumulation dtype of `sources` (fp32; fp64 for fp64 sources): the logits
    are (q * g) . s / rms(s)."""
    acc = torch.promote_types(sources[0].dtype, torch.float32)
    return query.to(acc) * key_norm_weight.to(acc)


def route(sources, query, key_norm_weight, eps, residual=None, fused=False):
    """The routed term (plus `residual`, if given: h = x + r in one pass on the fused kernel) and
    the routing weights (fp32 [K, ...]) for one sublayer. `fused`: run the Triton kernel
    (megatron_delta/kernels.py) where it takes these inputs; DepthRoute, the reference, otherwise."""
    weight = routing_weight(query, key_norm_weight, sources)
    if fused and kernels.supports(sources if residual is None else [*sources, residual]):
        return kernels.fused_route(sources, weight, eps, residual)
    routed, alpha = DepthRoute.apply(weight, eps, *sources)
    return (routed if residual is None else residual + routed), alpha


def route_block(sources, weights, eps, fused=False):
    """M sublayers routed over the same sources: (M routed terms, alpha [M, K, ...]). weights:
    [M, h] in the accumulation dtype. One pass over the sources on the fused kernel, M reference
    routes otherwise."""
    if fused and kernels.supports(sources):
        return kernels.route_block(sources, weights, eps)
    routed, alpha = zip(*(DepthRoute.apply(w, eps, *sources) for w in weights))
    return list(routed), torch.stack(alpha)


class DepthRouter(torch.nn.Module):
    """The routing parameters of one sublayer: a query q and the key RMSNorm weight g
    (2 * hidden parameters), plus, under init="identity", a zero-initialised scalar gate on the
    routed term so that an additive model starts exactly at the standard model.

    Parameters are replicated over tensor parallelism; under sequence parallelism each TP rank
    sees only its tokens, so they carry `sequence_parallel` and finalize_model_grads sums their
    gradients over TP. Built from the layer spec (get_gpt_delta_layer_spec) by build_module.
    """

    def __init__(self, config, delta, label: str):
        super().__init__()
        self.label = label
        self.eps = delta.norm_epsilon
        # Decided once, here: the fused kernels where this machine runs them (per call only the
        # inputs' dtype and layout are checked).
        self.fused = kernels.enabled()
        # Like Megatron's layers: the default device (CPU, or meta while planning) or the GPU.
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        hidden, dtype = config.hidden_size, config.params_dtype
        self.query = torch.nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.key_norm_weight = torch.nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.gate = (
            torch.nn.Parameter(torch.zeros(1, device=device, dtype=dtype)) if delta.has_gate else None
        )
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.query)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
        self.stats = None  # a _RouterStats while collect_routing_stats is active

    def forward(self, sources, residual=None):
        """residual + route(sources) (just the routed term when `residual` is None). Without a
        gate the add is fused into the GPU kernel's single write of h."""
        fused_add = self.gate is None
        out, alpha = route(sources, self.query, self.key_norm_weight, self.eps,
                           residual if fused_add else None, fused=self.fused)
        self._record(alpha)
        return out if fused_add else self._gated(out, residual)

    def _gated(self, routed, residual):
        routed = routed if self.gate is None else routed * self.gate
        return routed if residual is None else residual + routed

    def _record(self, alpha):
        if self.stats is not None:
            self.stats.add(alpha)


def route_sublayers(routers, sources) -> list:
    """The routed terms of several sublayers that read the same sources (the sublayers of one
    delta_block block: its sources are fixed and its queries static), in one pass over the
    sources on GPU (route_block); [routed term of each router, gate applied]."""
    weights = torch.stack([routing_weight(r.query, r.key_norm_weight, sources) for r in routers])
    routed, alpha = route_block(sources, weights, routers[0].eps, fused=routers[0].fused)
    for router, a in zip(routers, alpha):
        router._record(a)
    return [router._gated(r, None) for router, r in zip(routers, routed)]


class _RouterStats:
    """Running means over tokens and calls of one router's routing weights."""

    def __init__(self):
        self.calls = 0
        self.max_weight = 0.0
        self.entropy = 0.0
        self.mean_weight = None

    @torch.no_grad()
    def add(self, alpha):
        alpha = alpha.flatten(1)  # [K, tokens]
        self.calls += 1
        self.max_weight += alpha.max(0).values.mean().item()
        self.entropy += -(alpha * alpha.clamp_min(1e-12).log()).sum(0).mean().item()
        mean = alpha.mean(1).cpu()
        self.mean_weight = mean if self.mean_weight is None else self.mean_weight + mean

    def summary(self):
        return {
            "max_weight": self.max_weight / self.calls,
            "entropy": self.entropy / self.calls,
            "mean_weight": (self.mean_weight / self.calls).tolist(),
            "num_sources": len(self.mean_weight),
        }


class RoutingStats:
    """What collect_routing_stats yields: per-router statistics of the forwards it saw."""

    def __init__(self):
        self._stats = defaultdict(_RouterStats)

    def summary(self):
        """{"layer_03.attention": {"max_weight", "entropy", "mean_weight", "num_sources"}, ...}
        for the routers on this rank that ran at least once."""
        return {label: s.summary() for label, s in sorted(self._stats.items()) if s.calls}


@contextlib.contextmanager
def collect_routing_stats(models):
    """Record routing sharpness (mean max weight, entropy) of every router in `models` (a module
    or a list of model chunks) during the forwards run inside the context."""
    models = models if isinstance(models, (list, tuple)) else [models]
    routers = [m for model in models for m in model.modules() if isinstance(m, DepthRouter)]
    stats = RoutingStats()
    for router in routers:
        router.stats = stats._stats[router.label]
    try:
        yield stats
    finally:
        for router in routers:
            router.stats = None
