"""The routing parameters as a group: which parameters they are, how many, and their learning rate.

Routing parameters live in DepthRouter modules: "decoder.layers.N.attention_router.query",
"decoder.layers.N.mlp_router.key_norm_weight", "decoder.final_router.query", ... The trainer, the
Megatron-LM integration, the plan and the converter all select them through this module.
"""

from __future__ import annotations

import fnmatch

from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

# fnmatch pattern on the parameter name, as Megatron's ParamKey takes it. "_router." and not
# "router": Megatron's MoE layers hold a token router too ("decoder.layers.N.mlp.router.weight"),
# which is no depth-routing parameter (no router learning rate, not counted, not optional on import).
ROUTER_PARAM_PATTERN = "*_router.*"


def is_routing_parameter(name: str) -> bool:
    return fnmatch.fnmatchcase(name, ROUTER_PARAM_PATTERN)


def router_lr_overrides(optimizer_config, router_lr_mult: float) -> dict:
    """Megatron-Core optimizer config overrides (ParamKey -> ParamGroupOverride) giving the routing
    parameters their own LR schedule, both ends scaled by router_lr_mult; empty when it is 1."""
    if router_lr_mult == 1.0:
        return {}
    return {ParamKey(name=ROUTER_PARAM_PATTERN): ParamGroupOverride(
        max_lr=optimizer_config.lr * router_lr_mult, min_lr=optimizer_config.min_lr * router_lr_mult)}


def is_expert_parameter(param) -> bool:
    """Megatron's mark for expert weights: split over expert-parallel ranks and reduced (and, by
    the distributed optimizer, sharded) over the expert-data-parallel group instead of the DP group."""
    return not getattr(param, "allreduce", True)


def count_parameters(chunks, tensor_model_parallel_size: int, expert_model_parallel_size: int = 1,
                     expert_tensor_parallel_size: int = 1) -> tuple[int, int, int]:
    """(all parameters, routing parameters, expert parameters) of one pipeline rank's model chunks, for its whole
    tensor- and expert-parallel group: TP-split weights count tp times, expert weights ep times
    (and etp times when split over expert TP), the tied output-layer copy on the last stage
    (`shared`) not at all. Summing this over pipeline ranks gives the model's size."""
    total = routing = experts = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if getattr(param, "shared", False):
                continue
            split = getattr(param, "tensor_model_parallel", False)
            if is_expert_parameter(param):
                copies = expert_model_parallel_size * (expert_tensor_parallel_size if split else 1)
                experts += param.numel() * copies
            else:
                copies = tensor_model_parallel_size if split else 1
            total += param.numel() * copies
            routing += param.numel() if is_routing_parameter(name) else 0
    return total, routing, experts
