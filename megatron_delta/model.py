"""DeltaGPTModel and its layer spec: Megatron's GPTModel with depth-routed residuals.

    delta = DeltaResidualConfig(variant="delta_block", num_blocks=4)
    spec = get_gpt_delta_layer_spec(delta, backend="local")       # or "transformer_engine"
    model = DeltaGPTModel(config=transformer_config, delta=delta, transformer_layer_spec=spec, ...)

The spec is Megatron's own GPT layer spec with the layer class swapped and the two depth routers
added to its submodules (`dataclasses.replace(spec, module=DeltaTransformerLayer,
submodules=DeltaTransformerLayerSubmodules(..., attention_router=..., mlp_router=...))`), so
attention, MLP, norms, bias-dropout-add and their TP/SP/FP8 behaviour are Megatron's. The model
is a GPTModel whose decoder is a DeltaTransformerBlock; `variant="standard"` builds exactly
GPTModel.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.quantization.utils import get_quant_config_or_none
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.utils import get_pg_rank

from megatron_delta import compat
from megatron_delta.block import DeltaTransformerBlock
from megatron_delta.config import DeltaConfigError, DeltaResidualConfig
from megatron_delta.layer import DeltaTransformerLayer, DeltaTransformerLayerSubmodules
from megatron_delta.routing import DepthRouter

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
BACKENDS = ("local", "transformer_engine")


class LocalNorm:
    """Megatron's WrappedTorchNorm (torch LayerNorm / RMSNorm), usable under sequence parallelism:
    its weights carry `sequence_parallel` so finalize_model_grads sums their grads over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise DeltaConfigError(
                f"normalization={config.normalization!r} is not supported by the local backend; "
                "use 'RMSNorm' or 'LayerNorm'"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def require_transformer_engine(what: str) -> None:
    if not HAVE_TE:
        raise DeltaConfigError(
            f"{what} needs NVIDIA Transformer Engine, which is not installed: "
            "`pip install megatron-delta[te]` on a CUDA machine, or use backend='local' without fp8"
        )


def _with_local_norms(spec):
    """Swap every WrappedTorchNorm in a local layer spec for LocalNorm."""
    def swap(norm):
        return LocalNorm if norm is WrappedTorchNorm else norm

    sub = spec.submodules
    attention = sub.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules,
        q_layernorm=swap(attention.submodules.q_layernorm),
        k_layernorm=swap(attention.submodules.k_layernorm),
    ))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        sub, input_layernorm=swap(sub.input_layernorm), pre_mlp_layernorm=swap(sub.pre_mlp_layernorm),
        self_attention=attention,
    ))


def get_gpt_delta_layer_spec(delta: DeltaResidualConfig, backend: str = "local", **spec_kwargs):
    """Megatron's GPT layer spec for `backend`, with the layer routed as `delta` says.

    spec_kwargs go to Megatron's spec function (qk_layernorm, normalization, ...).
    """
    if backend == "transformer_engine":
        require_transformer_engine("backend='transformer_engine'")
        spec = get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    elif backend == "local":
        spec = _with_local_norms(get_gpt_layer_local_spec(**spec_kwargs))
    else:
        raise DeltaConfigError(f"backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return routed_layer_spec(spec, delta)


def get_gpt_delta_decoder_block_spec(delta: DeltaResidualConfig, config, backend: str = "local",
                                     normalization=None, qk_l2_norm: bool = False, vp_stage=None, pp_rank=None):
    """Megatron's GPT decoder block spec (`get_gpt_decoder_block_spec`: one layer spec per layer of
    this pipeline stage / virtual stage, dense or MoE as `config.moe_layer_freq` says), with every
    layer routed as `delta` says. Needed for MoE models whose layers differ (dense first layers);
    pass the result to DeltaGPTModel as `transformer_layer_spec`."""
    if backend not in BACKENDS:
        raise DeltaConfigError(f"backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "transformer_engine":
        require_transformer_engine("backend='transformer_engine'")
    local = backend == "local"
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=not local, normalization=normalization,
                                       qk_l2_norm=qk_l2_norm, vp_stage=vp_stage, pp_rank=pp_rank)
    layer_specs = [routed_layer_spec(_with_local_norms(spec) if local else spec, delta) for spec in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layer_specs, layer_norm=LocalNorm if local else block.layer_norm)


def get_gpt_delta_mtp_block_spec(config, layer_spec, backend: str = "local", vp_stage=None, pp_rank=None):
    """Megatron's multi-token-prediction block spec (`get_gpt_mtp_block_spec`; None on the stages
    without the MTP block) around `layer_spec`, a plain (`standard`) layer or decoder block spec:
    MTP layers route over nothing (see the README). With the local backend its norms are
    LocalNorm, like the decoder's, so that it also runs under sequence parallelism."""
    block = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=backend == "transformer_engine",
                                   vp_stage=vp_stage, pp_rank=pp_rank)
    if block is None or backend != "local":
        return block
    norms = dict(enorm=LocalNorm, hnorm=LocalNorm, layer_norm=LocalNorm)
    layer_specs = [dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **norms))
                   for spec in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layer_specs)


def get_gpt_delta_model_specs(delta: DeltaResidualConfig, config, backend: str = "local", vp_stage=None,
                              pp_rank=None, **spec_kwargs):
    """(transformer_layer_spec, mtp_block_spec) of a DeltaGPTModel for `config`, as Megatron picks
    them for a GPTModel: one routed layer spec for a dense model; for an MoE model
    (config.num_moe_experts) the decoder block spec of this stage, dense and MoE layers as
    moe_layer_freq says; with config.mtp_num_layers the MTP block around an unrouted copy of the
    layers (None without MTP, and on stages without the block). spec_kwargs: Megatron's spec
    options (qk_layernorm, normalization, qk_l2_norm, ...; an MoE block takes the first two from
    `config`)."""
    def layer_spec(routing: DeltaResidualConfig):
        if config.num_moe_experts:
            return get_gpt_delta_decoder_block_spec(routing, config, backend=backend, vp_stage=vp_stage, pp_rank=pp_rank,
                                                    normalization=spec_kwargs.get("normalization"),
                                                    qk_l2_norm=spec_kwargs.get("qk_l2_norm", False))
        return get_gpt_delta_layer_spec(routing, backend=backend, **spec_kwargs)

    mtp_block_spec = None
    if config.mtp_num_layers:
        mtp_block_spec = get_gpt_delta_mtp_block_spec(config, layer_spec(DeltaResidualConfig("standard")),
                                                      backend=backend, vp_stage=vp_stage, pp_rank=pp_rank)
    return layer_spec(delta), mtp_block_spec


def routed_layer_spec(spec: ModuleSpec, delta: DeltaResidualConfig) -> ModuleSpec:
    """Megatron's layer spec `spec`, routed as `delta` says: the layer class swapped for
    DeltaTransformerLayer and the two sublayers' depth routers added to its submodules (the spec
    unchanged for the standard variant)."""
    if not delta.routed:
        return spec
    router = ModuleSpec(module=DepthRouter, params={"delta": delta})
    submodules = DeltaTransformerLayerSubmodules(
        **{field.name: getattr(spec.submodules, field.name) for field in dataclasses.fields(spec.submodules)},
        attention_router=router, mlp_router=router,
    )
    return dataclasses.replace(spec, module=DeltaTransformerLayer, submodules=submodules,
                               params={**spec.params, "delta": delta})


def _uses_transformer_engine(layer_spec) -> bool:
    qkv = layer_spec.submodules.self_attention.submodules.linear_qkv
    return getattr(qkv, "__module__", "").startswith("megatron.core.extensions.transformer_engine")


def _final_norm(layer_spec):
    if _uses_transformer_engine(layer_spec):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return LocalNorm


class DeltaGPTModel(GPTModel):
    """GPTModel with depth-routed residuals; same forward signature and sharded_state_dict.

    Args are GPTModel's, plus `delta`. `transformer_layer_spec` is a layer spec from
    get_gpt_delta_layer_spec (or a TransformerBlockSubmodules).
    """

    def __init__(self, config, delta: DeltaResidualConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage=None, pg_collection=None, **gpt_kwargs):
        compat.check_supported()
        if not isinstance(delta, DeltaResidualConfig):
            raise DeltaConfigError(f"delta must be a DeltaResidualConfig, got {type(delta).__name__}")
        delta.validate_for(config)
        if config.fp8:
            require_transformer_engine(f"fp8={config.fp8!r}")
        block_spec = self._block_spec(config, transformer_layer_spec, vp_stage, pg_collection)
        layer_class = block_spec.layer_specs[0].module if block_spec.layer_specs else None
        if delta.routed and layer_class is not None and not issubclass(layer_class, DeltaTransformerLayer):
            raise DeltaConfigError(
                f"delta.variant={delta.variant!r} needs the layer spec from get_gpt_delta_layer_spec(delta), "
                f"got a spec for {layer_class.__name__}"
            )
        if config.fp8 and layer_class is not None and not _uses_transformer_engine(block_spec.layer_specs[0]):
            raise DeltaConfigError("fp8 needs backend='transformer_engine' in get_gpt_delta_layer_spec")

        # For routed variants GPTModel first builds an empty decoder (no layers, no weights, no RNG
        # drawn), which is then replaced by the routed block built from the real spec.
        super().__init__(
            config=config,
            transformer_layer_spec=block_spec if not delta.routed else TransformerBlockSubmodules([], None),
            vocab_size=vocab_size, max_sequence_length=max_sequence_length, pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage, pg_collection=pg_collection, **gpt_kwargs,
        )
        self.delta = delta
        self.transformer_layer_spec = transformer_layer_spec
        if self.mtp_process and self.share_embeddings_and_output_weights and not self.pre_process:
            # A later pipeline stage with the MTP block holds its own copy of the embedding, which
            # is the shared output weight there; GPTModel still allocates an output-layer weight
            # that nothing reads and that Megatron's checkpointing refuses on that stage
            # (LanguageModule.tie_embeddings_and_output_weights_state_dict asserts it is absent).
            self.output_layer.weight = None
        if delta.routed:
            self.decoder = DeltaTransformerBlock(
                config=self.config, spec=block_spec, delta=delta, pre_process=self.pre_process,
                post_process=self.post_process, pg_collection=self.pg_collection, vp_stage=vp_stage,
            )
            # GPTModel.__init__ finishes quantisation setup of the modules it built; do the same here.
            for name, module in self.decoder.named_modules(prefix="decoder"):
                if hasattr(module, "finish_init"):
                    module.finish_init(get_quant_config_or_none(name, self.config.quant_recipe))

    def _preprocess(self, *args, **kwargs):
        """GPTModel's, with the rotary table cut to the sequence: on a later pipeline stage GPTModel
        sizes it from the packed input ([slots * s, b, h]), and both the decoder's layers and the
        MTP block (on the last stage) need positions 0..s-1, its first s rows."""
        output = super()._preprocess(*args, **kwargs)
        slots = getattr(self.decoder, "pipeline_slots", 1)
        rotary_pos_emb = output[1]
        if self.pre_process or slots == 1 or rotary_pos_emb is None:
            return output
        return (output[0], rotary_pos_emb[: rotary_pos_emb.shape[0] // slots], *output[2:])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return super().sharded_state_dict(prefix, sharded_offsets, compat.sharded_state_dict_metadata(metadata))

    @staticmethod
    def _block_spec(config, layer_spec, vp_stage, pg_collection):
        if isinstance(layer_spec, TransformerBlockSubmodules):
            return layer_spec
        pp_group = pg_collection.pp if pg_collection is not None else None
        pp_rank = get_pg_rank(pp_group) if pp_group is not None else None
        num_layers = get_num_layers_to_build(config, vp_stage, pp_rank)
        return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=_final_norm(layer_spec))
