"""DeltaResidualConfig: which depth-routing variant a GPT model uses, and the checks that keep
a configuration from failing deep inside Megatron.

Variants (see README and shared method notes):

    standard       plain pre-norm residual; the model *is* Megatron's GPTModel
    delta          h_k = x_{k-1} + route({x_0, v_1..v_{k-1}})            additive, per sublayer
    delta_block    h_k = x_{k-1} + route({x_0, D_0..D_{b-1}})            additive, per block
    attnres_block  h_k = route({x_0, B_0..B_{b-1}, partial_b})           replacement (Kimi)
    attnres_full   h_k = route({x_0, v_1..v_{k-1}})                      replacement (Kimi)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

VARIANTS = ("standard", "delta", "delta_block", "attnres_block", "attnres_full")
ADDITIVE_VARIANTS = ("delta", "delta_block")
BLOCK_VARIANTS = ("delta_block", "attnres_block")
INITS = ("reference", "identity")
# Selective-recompute modules that our layer forward implements (core_attn is done inside
# Megatron's attention module; mlp is checkpointed by the layer).
SUPPORTED_RECOMPUTE_MODULES = ("core_attn", "mlp")


class DeltaConfigError(ValueError):
    """A configuration that cannot work, caught before any model is built."""


@dataclasses.dataclass(frozen=True)
class DeltaResidualConfig:
    """How every sublayer of a GPT model reads its input.

    Attributes:
        variant: one of VARIANTS.
        num_blocks: number of blocks B for the block variants (layers are grouped in blocks of
            ceil(num_layers / B)); ignored by the others.
        init: "reference" (query ~ N(0, init_method_std), key-norm weight 1: the paper's init) or
            "identity" (additionally a zero-initialised scalar gate on the routed term, so that an
            additive model computes exactly the standard model at initialisation: the init used to
            convert pretrained checkpoints).
        norm_epsilon: epsilon of the RMSNorm applied to the routing keys.
    """

    variant: Literal["standard", "delta", "delta_block", "attnres_block", "attnres_full"] = "delta_block"
    num_blocks: int = 4
    init: Literal["reference", "identity"] = "reference"
    norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise DeltaConfigError(
                f"delta.variant={self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}"
            )
        if self.init not in INITS:
            raise DeltaConfigError(f"delta.init={self.init!r} is unknown; choose one of {', '.join(INITS)}")
        if self.init == "identity" and self.variant not in ADDITIVE_VARIANTS + ("standard",):
            raise DeltaConfigError(
                f"delta.init='identity' needs an additive variant (delta, delta_block); "
                f"{self.variant} replaces the residual stream and has no identity initialisation"
            )
        if self.uses_blocks and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise DeltaConfigError(f"delta.num_blocks={self.num_blocks!r} must be an integer >= 1")
        if not self.norm_epsilon > 0:
            raise DeltaConfigError(f"delta.norm_epsilon={self.norm_epsilon!r} must be > 0")

    @property
    def routed(self) -> bool:
        return self.variant != "standard"

    @property
    def additive(self) -> bool:
        """Additive routing keeps the residual stream; replacement routing rebuilds it."""
        return self.variant in ADDITIVE_VARIANTS

    @property
    def uses_blocks(self) -> bool:
        return self.variant in BLOCK_VARIANTS

    @property
    def block_sources_fixed(self) -> bool:
        """delta_block: all sublayers of a block route over the same sources (x_0 and the completed
        block deltas) with static queries, so a block's routed terms can be computed in one pass."""
        return self.variant == "delta_block"

    @property
    def has_gate(self) -> bool:
        return self.init == "identity" and self.routed

    def layers_per_block(self, num_layers: int) -> int:
        """Block size for the block variants; every layer is its own block otherwise."""
        return math.ceil(num_layers / self.num_blocks) if self.uses_blocks else 1

    def routing_params_per_layer(self, hidden_size: int) -> int:
        """Query + key-norm weight for each of the two sublayers (+ the identity gates)."""
        if not self.routed:
            return 0
        return 2 * (2 * hidden_size + (1 if self.has_gate else 0))

    def final_routing_params(self, hidden_size: int) -> int:
        """Replacement variants route once more before the final norm (Kimi's final AttnRes)."""
        return 0 if (self.additive or not self.routed) else 2 * hidden_size

    def validate_for(self, transformer_config) -> None:
        """Check this routing config against a Megatron TransformerConfig; one clear line per
        problem, naming the field and the fix."""
        cfg = transformer_config
        _validate_moe(cfg)
        if not self.routed:
            return
        num_layers = cfg.num_layers
        if self.uses_blocks:
            if self.num_blocks > num_layers:
                raise DeltaConfigError(
                    f"delta.num_blocks={self.num_blocks} exceeds model.num_layers={num_layers}; "
                    f"use at most {num_layers} blocks"
                )
            per_block = self.layers_per_block(num_layers)
            actual = math.ceil(num_layers / per_block)
            if actual != self.num_blocks:
                raise DeltaConfigError(
                    f"delta.num_blocks={self.num_blocks} with num_layers={num_layers} gives blocks of "
                    f"{per_block} layers and only {actual} blocks; pick num_blocks so that "
                    f"ceil(num_layers / num_blocks) blocks come out exactly (e.g. a divisor of {num_layers})"
                )
        pp = cfg.pipeline_model_parallel_size
        vpp = cfg.virtual_pipeline_model_parallel_size or 1
        for field in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                      "pipeline_model_parallel_layout"):
            if getattr(cfg, field, None) is not None:
                raise DeltaConfigError(
                    f"{field} (uneven pipeline split) is not supported with delta routing; "
                    f"use num_layers divisible by pipeline stages x virtual stages"
                )
        for field in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
            if getattr(cfg, field, False):
                raise DeltaConfigError(f"{field}=True is not supported with delta routing; set it False")
        check_pipeline_split(num_layers, pp, vpp)
        if cfg.context_parallel_size > 1:
            raise DeltaConfigError(
                f"context_parallel_size={cfg.context_parallel_size}: context parallelism does not compose "
                "with delta routing in this version (the pipeline pack would be split across CP ranks); use 1"
            )
        unsupported = {
            "multi_latent_attention": "multi-latent attention",
            "heterogeneous_block_specs": "heterogeneous layer specs",
            "cpu_offloading": "CPU activation offloading",
            "fine_grained_activation_offloading": "fine-grained activation offloading",
            "inference_fuse_tp_communication": "fused TP inference kernels",
            "fp4": "FP4",
        }
        for field, what in unsupported.items():
            if getattr(cfg, field, None):
                raise DeltaConfigError(
                    f"{field} is set: {what} does not compose with delta routing in this version; unset it"
                )
        if getattr(cfg, "cuda_graph_impl", "none") != "none" or getattr(cfg, "enable_cuda_graph", False):
            raise DeltaConfigError(
                "cuda_graph_impl is set: CUDA graphs do not compose with delta routing in this version "
                "(the per-layer source list changes the graph inputs); set cuda_graph_impl='none'"
            )
        if cfg.recompute_granularity == "selective":
            extra = set(cfg.recompute_modules or ()) - set(SUPPORTED_RECOMPUTE_MODULES)
            if extra:
                raise DeltaConfigError(
                    f"recompute_modules={sorted(extra)} is not supported with delta routing; "
                    f"use a subset of {list(SUPPORTED_RECOMPUTE_MODULES)} or recompute_granularity='full'"
                )
        if cfg.recompute_granularity == "full" and cfg.recompute_method not in ("uniform", "block"):
            raise DeltaConfigError(
                "recompute_granularity='full' needs recompute_method 'uniform' or 'block'"
            )


# The token dispatchers of megatron-core's MoE layer and the GPU libraries they need.
MOE_DISPATCHERS = ("allgather", "alltoall")


def _validate_moe(cfg) -> None:
    """What Megatron's MoE layer cannot do here, for every variant (standard included: these fail
    inside Megatron's MoE layer, not in the routing)."""
    if not getattr(cfg, "num_moe_experts", None):
        return
    if cfg.add_bias_linear:
        raise DeltaConfigError(
            "add_bias_linear=True with num_moe_experts: Megatron's expert MLP cannot train linear biases "
            "(in-place update of a view in backward); set add_bias_linear=False (MoE models are bias-free)"
        )
    if cfg.moe_token_dispatcher_type not in MOE_DISPATCHERS:
        raise DeltaConfigError(
            f"moe_token_dispatcher_type={cfg.moe_token_dispatcher_type!r} needs DeepEP / HybridEP "
            f"(GPU-only libraries) and is not supported by megatron-delta; use one of {', '.join(MOE_DISPATCHERS)}"
        )


def check_pipeline_split(num_layers: int, pp: int, vpp: int | None, layers: str = "model.num_layers",
                         stages: str = "pipeline stages x virtual stages") -> None:
    """Every pipeline stage and virtual stage holds the same number of layers (the pipeline
    transport, the plan and the converters rely on it). `layers` / `stages` name the fields in
    the caller's terms (YAML keys, command-line flags)."""
    if num_layers % (pp * (vpp or 1)):
        raise DeltaConfigError(
            f"{layers}={num_layers} is not divisible by {stages} = {pp} x {vpp or 1}; choose a layer count that is"
        )
