"""Train DeltaGPTModel with Megatron-LM's own training scripts (tags core_v0.16.1 and core_v0.19.0).

Megatron-LM's pretrain_gpt.py needs three things changed for a routed model, and this module
provides each one; both integration routes use them:

    flags        add_delta_args: --delta-variant, --delta-num-blocks, --delta-init,
                 --delta-norm-epsilon, --delta-router-lr-mult (an extra_args_provider)
    model        delta_gpt_builder: gpt_builders.gpt_builder's counterpart, building DeltaGPTModel
                 with the layer spec Megatron-LM would have chosen (TE or local, same options; MoE
                 decoder blocks with --num-experts, the MTP block with --mtp-num-layers)
    transport    get_forward_backward_func: Megatron-Core's, but the schedule is handed
                 seq_length = pipeline_seq_length(...), because stages exchange K tensors packed
                 along the sequence dim
  + router LR    router_lr_overrides: a parameter-group override that scales the learning rate
                 of the routing parameters, added to Megatron-LM's get_megatron_optimizer_config

Route 1, no edits to Megatron-LM: examples/megatron_lm/pretrain_gpt_delta.py calls
install_training_hooks(), which rebinds the two names that megatron/training/training.py looks up
at call time, then pretrain_with_model_provider() with delta_gpt_builder (it handles the two
training APIs: core_v0.16.1's pretrain() parses the flags itself; core_v0.19.0's takes a config
container built from flags parsed beforehand).
Route 2, a patched fork: patches/megatron-lm-<tag>-delta.patch imports the same functions into
arguments.py, gpt_builders.py and training.py (and, at core_v0.19.0, makes pretrain_gpt.py build
routed variants through gpt_builder instead of its GPTModelConfig).

Nothing here imports megatron.training at module import: the flag parsing, the config, the
seq_length wrapper and the optimizer override work (and are tested) without Megatron-LM.
"""

from __future__ import annotations

import argparse
import functools

from megatron.core.pipeline_parallel import get_forward_backward_func as core_get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_delta.block import link_virtual_stages
from megatron_delta.config import INITS, VARIANTS, DeltaConfigError, DeltaResidualConfig
from megatron_delta.model import DeltaGPTModel, get_gpt_delta_model_specs
from megatron_delta.parameters import router_lr_overrides  # patches/ import it from this module
from megatron_delta.transport import pipeline_seq_length

# Megatron-LM options that gpt_builders.gpt_builder honours but delta_gpt_builder does not:
# (args attribute, flag, why). Each is rejected with this line instead of being ignored.
_UNSUPPORTED_MEGATRON_LM_ARGS = (
    ("use_legacy_models", "--use-legacy-models", "delta residuals need Megatron-Core models"),
    ("spec", "--spec", "a custom layer spec replaces the one delta routing wraps; use "
                       "--transformer-impl to choose TE or local"),
    ("multi_latent_attention", "--multi-latent-attention",
     "multi-latent attention does not compose with delta routing"),
    ("experimental_attention_variant", "--experimental-attention-variant",
     "experimental attention variants do not compose with delta routing"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path",
     "heterogeneous layer specs do not compose with delta routing"),
)


def add_delta_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """extra_args_provider: the delta-residual flags. The default variant, `standard`, is exactly
    Megatron's GPT model, so a fork that always adds these flags behaves as upstream until asked."""
    group = parser.add_argument_group(title="delta residuals (megatron-delta)")
    defaults = DeltaResidualConfig()
    group.add_argument("--delta-variant", choices=VARIANTS, default="standard",
                       help="How each sublayer reads its input: standard (plain residual), delta, "
                            "delta_block, attnres_block, attnres_full.")
    group.add_argument("--delta-num-blocks", type=int, default=defaults.num_blocks,
                       help="Number of layer blocks B for delta_block / attnres_block; "
                            "ceil(num_layers / B) layers per block.")
    group.add_argument("--delta-init", choices=INITS, default=defaults.init,
                       help="reference: the paper's init; identity: additive variants start exactly "
                            "at the standard model (for converting pretrained checkpoints).")
    group.add_argument("--delta-norm-epsilon", type=float, default=defaults.norm_epsilon,
                       help="Epsilon of the RMSNorm applied to the routing keys.")
    group.add_argument("--delta-router-lr-mult", type=float, default=1.0,
                       help="Learning-rate multiplier for the routing parameters (max and min LR "
                            "of the schedule are both scaled).")
    return parser


def delta_config_from_args(args) -> DeltaResidualConfig:
    """The DeltaResidualConfig the flags describe (checked; raises DeltaConfigError)."""
    if not hasattr(args, "delta_variant"):
        raise DeltaConfigError(
            "the delta flags were not parsed: pass megatron_delta.megatron_lm.add_delta_args as "
            "extra_args_provider (Megatron-LM's --yaml-cfg, which replaces all flags, is not supported)"
        )
    if not args.delta_router_lr_mult > 0:
        raise DeltaConfigError(f"--delta-router-lr-mult={args.delta_router_lr_mult} must be > 0")
    return DeltaResidualConfig(variant=args.delta_variant, num_blocks=args.delta_num_blocks,
                               init=args.delta_init, norm_epsilon=args.delta_norm_epsilon)


def check_megatron_lm_args(args) -> None:
    """Reject Megatron-LM model options that delta_gpt_builder would otherwise silently drop."""
    for attribute, flag, why in _UNSUPPORTED_MEGATRON_LM_ARGS:
        if getattr(args, attribute, None):
            raise DeltaConfigError(f"{flag} is set: {why}; remove it or run Megatron-LM's pretrain_gpt.py")
    if args.transformer_impl not in ("local", "transformer_engine"):
        raise DeltaConfigError(
            f"--transformer-impl={args.transformer_impl} is not supported with delta residuals; "
            "use transformer_engine or local"
        )


def delta_model_specs(args, config, delta: DeltaResidualConfig, vp_stage=None):
    """(transformer_layer_spec, mtp_block_spec) as gpt_builders.gpt_builder picks them, with the same
    options, routed as `delta` says: the dense layer spec, or with --num-experts the decoder block
    spec (dense and MoE layers per --moe-layer-freq); with --mtp-num-layers the MTP block."""
    kitchen = dict(use_kitchen=config.use_kitchen, use_kitchen_attention=config.use_kitchen_attention,
                   kitchen_attention_backend=config.kitchen_attention_backend)
    if args.transformer_impl == "transformer_engine":
        return get_gpt_delta_model_specs(delta, config, "transformer_engine", vp_stage, qk_layernorm=args.qk_layernorm,
                                         qk_l2_norm=args.qk_l2_norm, **kitchen)
    return get_gpt_delta_model_specs(delta, config, "local", vp_stage, qk_layernorm=args.qk_layernorm,
                                     normalization=args.normalization, **kitchen)


def delta_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """gpt_builders.gpt_builder for DeltaGPTModel: same signature, same GPTModel arguments.

    Use as `functools.partial(model_provider, delta_gpt_builder)` (Megatron-LM's model_provider.py).
    """
    from megatron.training import print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    delta = delta_config_from_args(args)
    check_megatron_lm_args(args)
    print_rank_0(f"building DeltaGPTModel ({delta}) ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    delta.validate_for(config)
    layer_spec, mtp_block_spec = delta_model_specs(args, config, delta, vp_stage)
    return DeltaGPTModel(
        config=config,
        delta=delta,
        transformer_layer_spec=layer_spec,
        mtp_block_spec=mtp_block_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def with_pipeline_seq_length(forward_backward_func, delta: DeltaResidualConfig):
    """Wrap a Megatron-Core forward_backward_func so that the schedule's p2p buffers fit the packed
    depth state: seq_length -> pipeline_seq_length(delta, model config, seq_length). The schedules
    use seq_length only for those buffer shapes. Megatron-LM builds the model chunks one virtual
    stage at a time, so this is also where they get linked (link_virtual_stages; a no-op once
    done). The standard variant is returned unwrapped."""
    if not delta.routed:
        return forward_backward_func

    @functools.wraps(forward_backward_func)
    def forward_backward(*, model, seq_length, **kwargs):
        config = get_model_config(model[0] if isinstance(model, list) else model)
        link_virtual_stages(model)
        return forward_backward_func(model=model, seq_length=pipeline_seq_length(delta, config, seq_length),
                                     **kwargs)

    return forward_backward


def get_forward_backward_func(*args, **kwargs):
    """Drop-in for megatron.core.pipeline_parallel.get_forward_backward_func inside Megatron-LM's
    training loop: the schedule for this parallel layout, fed the delta transport's seq_length."""
    from megatron.training import get_args

    return with_pipeline_seq_length(core_get_forward_backward_func(*args, **kwargs),
                                    delta_config_from_args(get_args()))


def install_training_hooks() -> None:
    """Route 1 (no edits to Megatron-LM): make megatron/training/training.py use the delta
    transport and the router LR override. training.py looks up get_forward_backward_func and
    get_megatron_optimizer_config by module-level name when train() / evaluate() /
    setup_model_and_optimizer() run, so rebinding them before pretrain() is enough. Idempotent."""
    from megatron.training import training

    if training.get_forward_backward_func is get_forward_backward_func:
        return
    megatron_lm_optimizer_config = training.get_megatron_optimizer_config

    @functools.wraps(megatron_lm_optimizer_config)
    def get_megatron_optimizer_config(args):
        config, config_overrides = megatron_lm_optimizer_config(args)
        config_overrides.update(router_lr_overrides(config, args.delta_router_lr_mult))
        return config, config_overrides

    training.get_forward_backward_func = get_forward_backward_func
    training.get_megatron_optimizer_config = get_megatron_optimizer_config


def pretrain_with_model_provider(train_valid_test_datasets_provider, model_provider, forward_step_func, *,
                                 extra_args_provider, args_defaults, get_embedding_ranks) -> None:
    """Megatron-LM's pretrain() for a decoder-only model built by model_provider, with the
    command-line flags parsed by Megatron-LM plus extra_args_provider, for either training API
    (keyed on which one megatron.training has; in-process restart is honoured as
    pretrain_gpt.py does):

        core_v0.16.1   pretrain(datasets, model_provider, model_type, forward_step,
                                extra_args_provider=..., args_defaults=...) parses the flags itself
        core_v0.19.0   the flags are parsed first; pretrain(PretrainConfigContainer, datasets,
                       model_type, forward_step, model_provider=...), the container holding no
                       model config so that Megatron-LM builds the model with model_provider
    """
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain

    run_pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    try:
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
    except ImportError:  # core_v0.16.1
        run_pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder,
                     forward_step_func, extra_args_provider=extra_args_provider, args_defaults=args_defaults,
                     store=store, get_embedding_ranks=get_embedding_ranks)
        return
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
    run_pretrain(pretrain_cfg_container_from_args(args), train_valid_test_datasets_provider,
                 ModelType.encoder_or_decoder, forward_step_func, model_provider=model_provider, store=store,
                 get_embedding_ranks=get_embedding_ranks)
