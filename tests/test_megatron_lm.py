"""Megatron-LM integration (megatron_delta/megatron_lm.py, examples/megatron_lm/, patches/).

Always run: the delta flags -> DeltaResidualConfig, the checks of Megatron-LM options, the layer
spec choice, the forward-backward wrapper's seq_length and the router LR parameter groups.

Run only with MEGATRON_LM_PATH pointing at a clean Megatron-LM checkout of tag core_v0.16.1 or
core_v0.19.0 (recognised by its training API; plus Megatron-LM's own Python requirements: six,
pybind11 and an importable triton): the launcher trains a tiny GPT on CPU (1 rank, and 2 pipeline
stages), the tag's patch applies with `git apply --check` to the checkout's files, and a copy
patched with it trains too.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp

from megatron_delta import (
    DeltaConfigError,
    DeltaGPTModel,
    DeltaResidualConfig,
    get_gpt_delta_layer_spec,
    megatron_lm,
)
from megatron_delta.layer import DeltaTransformerLayer
from megatron_delta.model import HAVE_TE

import launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "examples", "megatron_lm", "pretrain_gpt_delta.py")
MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
needs_megatron_lm = pytest.mark.skipif(
    not MEGATRON_LM_PATH,
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1 or core_v0.19.0) to run",
)


def parse(*flags):
    return megatron_lm.add_delta_args(argparse.ArgumentParser()).parse_args(list(flags))


def transformer_config(**overrides):
    kwargs = dict(num_layers=8, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                  normalization="RMSNorm", add_bias_linear=False, params_dtype=torch.float32,
                  pipeline_dtype=torch.float32)
    return TransformerConfig(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------ flags -> config

def test_delta_flags_parse_into_the_config():
    args = parse("--delta-variant", "attnres_block", "--delta-num-blocks", "2", "--delta-init", "reference",
                 "--delta-norm-epsilon", "1e-5", "--delta-router-lr-mult", "3")
    assert megatron_lm.delta_config_from_args(args) == DeltaResidualConfig(
        variant="attnres_block", num_blocks=2, init="reference", norm_epsilon=1e-5)
    assert args.delta_router_lr_mult == 3.0


def test_default_flags_are_the_standard_model():
    """A fork that always adds the flags must behave as upstream until one is given."""
    args = parse()
    delta = megatron_lm.delta_config_from_args(args)
    assert delta == DeltaResidualConfig(variant="standard") and not delta.routed
    assert args.delta_router_lr_mult == 1.0


def test_unknown_variant_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--delta-variant", "delta-block")
    assert "--delta-variant: invalid choice: 'delta-block'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--delta-variant", "delta_block", "--delta-num-blocks", "0"), "delta.num_blocks=0 must be an integer >= 1"),
    (("--delta-variant", "attnres_full", "--delta-init", "identity"), "delta.init='identity' needs an additive"),
    (("--delta-norm-epsilon", "0"), "delta.norm_epsilon=0.0 must be > 0"),
    (("--delta-router-lr-mult", "0"), "--delta-router-lr-mult=0.0 must be > 0"),
])
def test_bad_flag_values_give_one_clear_error(flags, message):
    with pytest.raises(DeltaConfigError, match=re.escape(message)):
        megatron_lm.delta_config_from_args(parse(*flags))


def test_args_without_the_delta_flags_say_how_to_add_them():
    with pytest.raises(DeltaConfigError, match="pass megatron_delta.megatron_lm.add_delta_args"):
        megatron_lm.delta_config_from_args(argparse.Namespace(seq_length=32))


# ------------------------------------------------------------------------ Megatron-LM options

def megatron_lm_args(**overrides):
    """The Megatron-LM arguments delta_gpt_builder reads, at Megatron-LM's defaults."""
    defaults = dict(use_legacy_models=False, spec=None, num_experts=None, multi_latent_attention=False,
                    experimental_attention_variant=None, heterogeneous_layers_config_path=None,
                    mtp_num_layers=None, transformer_impl="transformer_engine", qk_layernorm=False,
                    qk_l2_norm=False, normalization="LayerNorm")
    return argparse.Namespace(**{**defaults, **overrides})


def test_megatron_lm_defaults_pass_the_checks():
    megatron_lm.check_megatron_lm_args(megatron_lm_args())
    megatron_lm.check_megatron_lm_args(megatron_lm_args(transformer_impl="local"))


@pytest.mark.parametrize("attribute, value, flag", [
    ("use_legacy_models", True, "--use-legacy-models"),
    ("spec", ["my.module", "my_spec"], "--spec"),
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("experimental_attention_variant", "gated_delta_net", "--experimental-attention-variant"),
    ("heterogeneous_layers_config_path", "layers.json", "--heterogeneous-layers-config-path"),
    ("transformer_impl", "inference_optimized", "--transformer-impl=inference_optimized"),
])
def test_options_the_delta_builder_cannot_honour_are_refused(attribute, value, flag):
    with pytest.raises(DeltaConfigError, match=re.escape(flag)):
        megatron_lm.check_megatron_lm_args(megatron_lm_args(**{attribute: value}))


def test_local_spec_gets_megatron_lm_options():
    """--transformer-impl local: the local spec, with --qk-layernorm and the normalization applied."""
    delta = DeltaResidualConfig("delta_block", 2)
    args = megatron_lm_args(transformer_impl="local", qk_layernorm=True, normalization="RMSNorm")
    spec, mtp = megatron_lm.delta_model_specs(args, transformer_config(), delta)
    assert spec.module is DeltaTransformerLayer and spec.params["delta"] == delta and mtp is None
    attention = spec.submodules.self_attention.submodules
    assert attention.q_layernorm is not IdentityOp and attention.k_layernorm is not IdentityOp
    plain, _ = megatron_lm.delta_model_specs(megatron_lm_args(transformer_impl="local"), transformer_config(), delta)
    assert plain.submodules.self_attention.submodules.q_layernorm is IdentityOp


def test_moe_and_mtp_flags_build_megatrons_moe_block_and_mtp_block(single_process_world):
    """--num-experts with --moe-layer-freq: the decoder block spec, a routed spec per layer with
    Megatron's MoE MLP where the frequency says; --mtp-num-layers: the MTP block around an
    unrouted layer. The model has the trainer's routing parameters (4 x hidden per decoder layer)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    delta = DeltaResidualConfig("delta_block", 2)
    config = transformer_config(num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                moe_layer_freq=[0, 1, 1, 1], mtp_num_layers=1, moe_token_dispatcher_type="allgather")
    block, mtp = megatron_lm.delta_model_specs(megatron_lm_args(transformer_impl="local", num_experts=4,
                                                                mtp_num_layers=1, normalization="RMSNorm"),
                                               config, delta)
    assert [spec.module for spec in block.layer_specs] == [DeltaTransformerLayer] * 4
    assert len(mtp.layer_specs) == 1
    model = DeltaGPTModel(config=config, delta=delta, transformer_layer_spec=block, mtp_block_spec=mtp,
                          vocab_size=128, max_sequence_length=32)
    assert [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers] == [False, True, True, True]
    # The MTP layer's transformer layer (its attribute name differs between releases): unrouted, MoE.
    (mtp_layer,) = [m for m in model.mtp.layers[0].modules() if isinstance(m, TransformerLayer)]
    assert type(mtp_layer) is not DeltaTransformerLayer and isinstance(mtp_layer.mlp, MoELayer)
    routing = sum(p.numel() for name, p in model.named_parameters() if "_router." in name)
    assert routing == 4 * 4 * 64


@pytest.mark.skipif(HAVE_TE, reason="checks the error raised without Transformer Engine")
def test_transformer_engine_impl_asks_for_the_te_spec():
    with pytest.raises(DeltaConfigError, match="needs NVIDIA Transformer Engine"):
        megatron_lm.delta_model_specs(megatron_lm_args(), transformer_config(), DeltaResidualConfig("delta"))


# ------------------------------------------------------------------ forward-backward seq_length

def record_call(**kwargs):
    return kwargs


def seq_length_handed_to_schedule(delta, config, seq_length=32):
    wrapped = megatron_lm.with_pipeline_seq_length(record_call, delta)
    # Megatron-LM passes the DDP-wrapped chunks; get_model_config unwraps `.module` to the config.
    chunk = torch.nn.Module()
    chunk.module = types.SimpleNamespace(config=config)
    model = [chunk]
    call = wrapped(forward_step_func="step", data_iterator=None, model=model, num_microbatches=4,
                   seq_length=seq_length, micro_batch_size=2, forward_only=False)
    assert {k: v for k, v in call.items() if k != "seq_length"} == dict(
        forward_step_func="step", data_iterator=None, model=model, num_microbatches=4,
        micro_batch_size=2, forward_only=False)
    return call["seq_length"]


@pytest.mark.parametrize("variant, num_blocks, pp, vpp, slots", [
    # 8 layers. One message carries the largest state crossing any boundary:
    # x (additive only) + x_0 + completed sources (+ the open block's partial sum).
    ("delta_block", 4, 2, None, 4),      # boundary at layer 4 = start of block 2: x, x_0, D_0, D_1
    ("delta_block", 8, 2, None, 6),      # blocks of 1 layer: x, x_0, D_0..D_3
    ("attnres_block", 4, 2, None, 3),    # replacement: no x
    ("delta_block", 2, 4, None, 4),      # boundary at layer 6 cuts block 1: x, partial, x_0, D_0
    ("delta_block", 2, 2, 2, 3),         # interleaved (2 stages x 2 chunks): a rank keeps x_0 and D_0
                                         # from its first chunk, so at most x, partial, x_0 cross
    ("delta", 4, 2, None, 10),           # per sublayer: x, x_0, v_1..v_8
    ("attnres_full", 4, 2, None, 9),
    ("delta_block", 4, 1, None, 1),      # no pipeline: nothing packed
])
def test_schedule_gets_the_packed_seq_length(variant, num_blocks, pp, vpp, slots):
    config = transformer_config(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    assert seq_length_handed_to_schedule(DeltaResidualConfig(variant, num_blocks), config) == slots * 32


def test_schedule_wrapper_links_the_model_chunks_of_a_rank(single_process_world):
    """Megatron-LM builds a rank's chunks one model-provider call at a time; the wrapper gives
    them one SourceCache (interleaved PP keeps sources between them) and keeps it afterwards."""
    delta = DeltaResidualConfig("delta_block", 2)
    chunks = [DeltaGPTModel(config=transformer_config(num_layers=4), delta=delta, vocab_size=128,
                            transformer_layer_spec=get_gpt_delta_layer_spec(delta, normalization="RMSNorm"),
                            max_sequence_length=32) for _ in range(2)]
    wrapped = megatron_lm.with_pipeline_seq_length(record_call, delta)
    wrapped(model=chunks, seq_length=32)
    cache = chunks[0].decoder.source_cache
    assert cache is not None and chunks[1].decoder.source_cache is cache
    wrapped(model=chunks, seq_length=32)
    assert chunks[0].decoder.source_cache is cache and chunks[1].decoder.source_cache is cache


def test_standard_model_keeps_megatrons_schedule_untouched():
    assert megatron_lm.with_pipeline_seq_length(record_call, DeltaResidualConfig("standard")) is record_call


# ---------------------------------------------------------------------------- router LR groups

def test_router_lr_mult_gives_routing_parameters_their_own_schedule(single_process_world):
    """Megatron-Core's own param grouping of a real DeltaGPTModel, with Megatron-LM's standard
    overrides plus ours: routing parameters (and only those) get 10x max and min LR."""
    delta = DeltaResidualConfig("delta_block", 2)
    config = transformer_config(num_layers=4)
    model = DeltaGPTModel(config=config, delta=delta, transformer_layer_spec=get_gpt_delta_layer_spec(
        delta, normalization="RMSNorm"), vocab_size=128, max_sequence_length=32)
    optimizer_config = OptimizerConfig(lr=1e-3, min_lr=1e-4)
    overrides = get_standard_config_overrides(optimizer_config)
    overrides.update(megatron_lm.router_lr_overrides(optimizer_config, 10.0))
    groups = _get_param_groups([model], optimizer_config, overrides)

    lr_of = {id(p): (g["max_lr"], g["min_lr"], g["wd_mult"]) for g in groups for p in g["params"]}
    router = [p for name, p in model.named_parameters() if "router" in name]
    others = [p for name, p in model.named_parameters() if "router" not in name]
    assert sum(p.numel() for p in router) == 4 * delta.routing_params_per_layer(64) == 1024
    for p in router:
        assert lr_of[id(p)] == pytest.approx((1e-2, 1e-3, 0.0))  # 1-D: no weight decay either
    for p in others:
        assert lr_of[id(p)][:2] == pytest.approx((1e-3, 1e-4))
    assert megatron_lm.router_lr_overrides(optimizer_config, 1.0) == {}


# ----------------------------------------------------------------- with a Megatron-LM checkout

# A GPT small enough for a 2-core CPU; Megatron-LM's fusions are CUDA kernels, so they are off.
TINY_GPT = """
--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
--normalization RMSNorm --position-embedding-type rope --swiglu --disable-bias-linear
--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 1
--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --eval-iters 1 --eval-interval 1000
--log-interval 1 --distributed-backend gloo --transformer-impl local --use-cpu-initialization
--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm
""".split()


def megatron_lm_tag() -> str:
    """The tag of the MEGATRON_LM_PATH checkout, told apart by the training API that
    megatron_lm.pretrain_with_model_provider keys on (core_v0.19.0 builds a config container)."""
    argument_utils = os.path.join(MEGATRON_LM_PATH, "megatron", "training", "argument_utils.py")
    if not os.path.isfile(argument_utils):
        pytest.fail(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} is not a Megatron-LM checkout of core_v0.16.1 or "
                    "core_v0.19.0 (no megatron/training/argument_utils.py)")
    with open(argument_utils) as source:
        return "core_v0.19.0" if "def pretrain_cfg_container_from_args(" in source.read() else "core_v0.16.1"


def megatron_lm_patch() -> str:
    return os.path.join(REPO, "patches", f"megatron-lm-{megatron_lm_tag()}-delta.patch")


# Megatron-LM core_v0.19.0 imports typing.override (Python >= 3.12, as its megatron-core); these
# machines run its Python code on 3.11, so its processes get the identical typing_extensions one.
_PY311_TYPING_OVERRIDE = (
    "import typing, typing_extensions\n"
    "if not hasattr(typing, 'override'):\n"
    "    typing.override = typing_extensions.override\n"
)


def megatron_lm_env(megatron_lm_root: str, scratch) -> dict:
    """Megatron-LM on PYTHONPATH, one thread per rank, and Megatron-LM's `make` of its dataset
    helpers building for this interpreter (its Makefile asks whatever `python3-config` is first
    on PATH for the extension suffix). On Python 3.11, a sitecustomize in `scratch` supplies
    typing.override."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    if sys.version_info < (3, 12):
        site = scratch / "py311"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_PY311_TYPING_OVERRIDE)
        inherited.append(str(site))
    path = os.pathsep.join([megatron_lm_root, REPO] + inherited)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            "MAKEFLAGS": f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}"}


def torchrun(script_args, nproc, megatron_lm_root, cwd, timeout=600):
    result = launcher.torchrun(nproc, *script_args, timeout=timeout, cwd=cwd, merge_output=True,
                               extra_env=megatron_lm_env(megatron_lm_root, cwd))
    return result.returncode, result.stdout


def training_losses(log: str) -> list:
    return [float(x) for x in re.findall(r"iteration\s+\d+/\s*\d+ \|.*?\| lm loss: ([0-9.Ee+-]+)", log)]


def padded_vocab_size(log: str) -> int:
    """The vocabulary the model was built with, as Megatron-LM logs it (NullTokenizer with 128
    tokens: 256 at core_v0.16.1, which adds an end-of-document token before padding; 128 at
    core_v0.19.0)."""
    return int(re.search(r"padded vocab \(size: \d+\) with \d+ dummy tokens \(new size: (\d+)\)", log).group(1))


def parameters_on_rank_0(log: str) -> int:
    """Megatron-LM's parameter count of model-parallel rank 0 (a (tp, pp) rank at core_v0.16.1,
    (tp, gtp, pp) at core_v0.19.0)."""
    return int(re.search(r"model parallel rank \(0(?:, 0)+\): (\d+)\n", log).group(1))


def assert_trains(returncode, log, iterations=6):
    errors = [line for line in log.splitlines() if "Error" in line]
    assert returncode == 0, "\n".join([log[-3000:], "errors:"] + errors)
    losses = training_losses(log)
    assert len(losses) == iterations, log[-3000:]
    assert all(math.isfinite(loss) for loss in losses), losses
    # At init the logits are near uniform over the padded vocabulary: ln(256) = 5.55, ln(128) = 4.85.
    assert abs(losses[0] - math.log(padded_vocab_size(log))) < 0.2, losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert "validation loss at iteration 6" in log
    print(f"lm loss per iteration: {losses}")
    return losses


@needs_megatron_lm
def test_launcher_trains_on_one_rank(tmp_path):
    returncode, log = torchrun([LAUNCHER, *TINY_GPT, "--delta-variant", "delta_block", "--delta-num-blocks", "2"],
                               1, MEGATRON_LM_PATH, tmp_path)
    assert_trains(returncode, log)
    assert "building DeltaGPTModel (DeltaResidualConfig(variant='delta_block', num_blocks=2" in log
    # Megatron-LM's GPT for these flags (swiglu ffn = 128, tied output): embedding vocab*64
    # + 4 layers * (qkv 64*192 + proj 64*64 + fc1 64*256 + fc2 128*64 + 2 norms) + final norm,
    # plus the routing parameters the launcher must have added.
    gpt = padded_vocab_size(log) * 64 + 4 * (64 * 192 + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64) + 64
    routing = 4 * DeltaResidualConfig("delta_block", 2).routing_params_per_layer(64)
    assert parameters_on_rank_0(log) == gpt + routing


@needs_megatron_lm
def test_launcher_trains_two_pipeline_stages(tmp_path):
    """The stages exchange [x, x_0, D_0, D_1] packed along the sequence dim: without the
    seq_length wrapper the schedule's p2p buffers would be 4x too small."""
    returncode, log = torchrun([LAUNCHER, *TINY_GPT, "--pipeline-model-parallel-size", "2",
                                "--delta-variant", "delta_block", "--delta-num-blocks", "4"],
                               2, MEGATRON_LM_PATH, tmp_path)
    assert_trains(returncode, log)


@needs_megatron_lm
def test_launcher_trains_an_moe_model_with_mtp_on_two_pipeline_stages(tmp_path):
    """Megatron-LM's own MoE and MTP flags: experts on layers 2-4 (allgather dispatcher, aux loss),
    one MTP layer on the last stage; two stages exchange the packed routing state."""
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
           "--moe-layer-freq", "[0,1,1,1]", "--moe-token-dispatcher-type", "allgather",
           "--moe-aux-loss-coeff", "1e-2", "--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2"]
    returncode, log = torchrun([LAUNCHER, *TINY_GPT, *moe, "--delta-variant", "delta_block", "--delta-num-blocks", "2"],
                               2, MEGATRON_LM_PATH, tmp_path)
    assert_trains(returncode, log)
    assert re.search(r"load_balancing_loss: [0-9.Ee+-]+", log) and re.search(r"mtp_1 loss: [0-9.Ee+-]+", log), log[-3000:]


@needs_megatron_lm
def test_launcher_refuses_bad_flags_before_training(tmp_path):
    returncode, log = torchrun([LAUNCHER, *TINY_GPT, "--delta-variant", "delta_block", "--delta-num-blocks", "3"],
                               1, MEGATRON_LM_PATH, tmp_path)
    assert returncode != 0
    assert "DeltaConfigError: delta.num_blocks=3 with num_layers=4 gives blocks of 2 layers" in log
    assert not training_losses(log)


def copy_of_checkout(destination, paths):
    """The checkout's files at `paths` (with any dataset helpers it has compiled), in a new git
    repository for `git apply`."""
    destination.mkdir()
    for path in paths:
        source = os.path.join(MEGATRON_LM_PATH, path)
        if os.path.isdir(source):
            shutil.copytree(source, destination / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / path)
    subprocess.run(["git", "init", "-q", str(destination)], check=True)
    return destination


@needs_megatron_lm
def test_patch_applies_cleanly_to_the_checkout(tmp_path):
    fork = copy_of_checkout(tmp_path / "megatron-lm", ["gpt_builders.py", "pretrain_gpt.py", "megatron/training"])
    check = subprocess.run(["git", "apply", "--check", megatron_lm_patch()], cwd=fork, capture_output=True,
                           text=True)
    assert check.returncode == 0, f"{megatron_lm_patch()} at {megatron_lm_tag()}:\n{check.stderr}"


@needs_megatron_lm
def test_patched_fork_trains_with_pretrain_gpt(tmp_path):
    """Megatron-LM's own pretrain_gpt.py, patched: delta routing over two pipeline stages with a
    router LR multiplier (run through a wrapper that only installs the CPU shim)."""
    fork = copy_of_checkout(tmp_path / "megatron-lm", ["megatron", "gpt_builders.py", "model_provider.py",
                                                       "pretrain_gpt.py"])
    subprocess.run(["git", "apply", megatron_lm_patch()], cwd=fork, check=True)
    runner = tmp_path / "cpu_pretrain_gpt.py"
    runner.write_text(
        "import runpy, sys\n"
        "from megatron_delta import cpu_shim\n"
        "cpu_shim.install_megatron_lm()\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    returncode, log = torchrun([str(runner), str(fork / "pretrain_gpt.py"), *TINY_GPT,
                                "--pipeline-model-parallel-size", "2", "--delta-variant", "delta",
                                "--delta-router-lr-mult", "10"], 2, str(fork), tmp_path)
    assert_trains(returncode, log)
    assert "building DeltaGPTModel (DeltaResidualConfig(variant='delta'" in log


@needs_megatron_lm
def test_llama3_recipe_arguments_parse_with_megatron_lm(tmp_path):
    """The shell recipe's command line, captured by a stand-in torchrun, goes through Megatron-LM's
    own argument parser (every flag exists at the tag) and carries the delta flags."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; "
                                      f"print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "MEGATRON_LM_PATH": MEGATRON_LM_PATH, "PP_SIZE": "2", "VPP_LAYERS": "4",
           "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    recipe = os.path.join(REPO, "examples", "megatron_lm", "train_llama3_8b_delta.sh")
    run = subprocess.run(["bash", recipe, str(tmp_path / "ckpt"), str(tmp_path / "tb")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    command = json.loads(run.stdout.splitlines()[-1])
    assert command[command.index("--nproc_per_node") + 1] == "8" and command[10] == LAUNCHER
    parse_with_megatron_lm = (
        "import json, sys\n"
        "from megatron.training.arguments import parse_args\n"
        "from megatron_delta.megatron_lm import add_delta_args, delta_config_from_args\n"
        "sys.argv = ['pretrain_gpt_delta.py'] + json.loads(sys.argv[1])\n"
        "args = parse_args(add_delta_args)\n"
        "print(json.dumps([repr(delta_config_from_args(args)), args.fp8, args.num_layers,\n"
        "                  args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage]))\n"
    )
    parsed = subprocess.run([sys.executable, "-c", parse_with_megatron_lm, json.dumps(command[11:])],
                            env=megatron_lm_env(MEGATRON_LM_PATH, tmp_path), capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    assert json.loads(parsed.stdout.splitlines()[-1]) == [
        repr(DeltaResidualConfig("delta_block", 8, "reference")), "hybrid", 32, 2, 4]


def test_moe_token_router_is_not_a_routing_parameter():
    """Megatron's MoE layers hold a token router (mlp.router.weight): no router LR, not counted as
    routing, not optional when a converted checkpoint is loaded."""
    from megatron_delta.parameters import is_routing_parameter

    routing = ["decoder.layers.0.attention_router.query", "module.decoder.layers.3.mlp_router.gate",
               "decoder.final_router.key_norm_weight"]
    moe = ["decoder.layers.1.mlp.router.weight", "decoder.layers.1.mlp.router.expert_bias"]
    assert [is_routing_parameter(name) for name in routing + moe] == [True] * 3 + [False] * 2
