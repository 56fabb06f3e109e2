"""Run config parsing and the checks made before any process group starts (no torch.distributed)."""

import dataclasses
import glob
import os
import sys

import pytest
import yaml

from megatron_delta.run_config import RunConfigError, from_dict, load_run_config, padded_vocab_size

import launcher

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
TINY = os.path.join(CONFIGS, "tiny_cpu.yaml")
TINY_MOE = os.path.join(CONFIGS, "tiny_moe_cpu.yaml")


def config_path(name):
    return os.path.join(CONFIGS, name)


def test_tiny_config_loads_with_typed_overrides():
    cfg = load_run_config(TINY, ["training.lr=3e-4", "data.blend=null", "parallel.sequence_parallel=false",
                                 "training.eval_interval=null", "model.num_query_groups=2"])
    assert cfg.training.lr == 3e-4 and isinstance(cfg.training.lr, float)  # YAML reads "3e-4" as a string
    assert cfg.data.blend is None and cfg.training.eval_interval is None
    assert cfg.model.num_query_groups == 2
    assert cfg.delta.variant == "delta_block" and cfg.delta.num_blocks == 2
    cfg.validate(world_size=1)
    # The resolved config written next to checkpoints reads back to the same config.
    assert from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override, named", [
    ("training.lrr=1", "training.lrr"),
    ("trainin.lr=1", "trainin"),
    ("model.num_layers=4.5", "model.num_layers"),
    ("model.num_layers=true", "model.num_layers"),
    ("training.lr=fast", "training.lr"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel"),
    ("model.normalization=BatchNorm", "model.normalization"),
    ("delta.variant=deltaa", "delta.variant"),
    ("data.tokenizer=gpt2", "data.tokenizer"),
    ("training.lr", "training.lr"),
])
def test_bad_keys_and_types_are_rejected_by_name(override, named):
    with pytest.raises(RunConfigError, match=named.replace(".", r"\.")):
        load_run_config(TINY, [override])


def test_unknown_nested_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: 4\n  hiden_size: 64\n")
    with pytest.raises(RunConfigError, match=r"model\.hiden_size"):
        load_run_config(str(path))


@pytest.mark.parametrize("overrides, world_size, named", [
    (["parallel.tensor_model_parallel_size=2"], 3, "tensor_model_parallel_size"),
    (["training.global_batch_size=12"], 8, "global_batch_size"),  # 12 % (8 micro x 8 dp)
    (["parallel.pipeline_model_parallel_size=3"], 3, "num_layers"),  # 4 layers on 3 stages
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"], 2,
     "num_layers"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "training.micro_batch_size=16"], 2, "interleaved"),  # one micro-batch cannot fill two stages
    (["parallel.virtual_pipeline_model_parallel_size=2"], 1, "virtual_pipeline_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=8"], 8, "num_attention_heads"),  # 4 heads
    (["model.num_query_groups=1", "parallel.tensor_model_parallel_size=2"], 2, "num_query_groups"),
    (["model.num_query_groups=3"], 1, "num_query_groups"),
    (["model.hidden_size=130"], 1, "hidden_size"),
    (["parallel.sequence_parallel=true"], 1, "sequence_parallel"),
    (["parallel.data_parallel_size=4"], 2, "data_parallel_size"),
    (["delta.num_blocks=8"], 1, "delta.num_blocks"),  # more blocks than layers (validate_for)
    (["delta.num_blocks=3"], 1, "delta.num_blocks"),  # ceil(4/3)=2 layers per block -> only 2 blocks
    (["training.lr_warmup_iters=500"], 1, "lr_warmup_iters"),
    (["training.min_lr=1.0"], 1, "min_lr"),
    (["data.split=100,0,0"], 1, "data.split"),
    (["checkpoint.finetune=true"], 1, "checkpoint.load"),
    (["parallel.overlap_param_gather=true"], 1, "use_distributed_optimizer"),
])
def test_impossible_runs_are_rejected_before_start(overrides, world_size, named):
    assert_rejected(TINY, overrides, world_size, named)


def assert_rejected(config, overrides, world_size, named):
    """Rejected as the commands check a config before they start: validate, then Megatron's checks."""
    from megatron_delta.run_config import build_transformer_config

    cfg = load_run_config(config, overrides)
    with pytest.raises(RunConfigError, match=named):
        cfg.validate(world_size=world_size)
        build_transformer_config(cfg, on_gpu=False)


def test_valid_meshes_of_the_tiny_config():
    for overrides, world_size in [
        ([], 2),  # dp 2
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"], 2),
        (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 4),  # tp2 x dp2
        (["parallel.pipeline_model_parallel_size=4", "delta.num_blocks=4"], 4),
    ]:
        cfg = load_run_config(TINY, overrides)
        cfg.validate(world_size=world_size)
        dp = world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
        assert cfg.num_microbatches(world_size) * cfg.training.micro_batch_size * dp == cfg.training.global_batch_size


PAPER_RECIPE = dict(adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, lr_decay_style="cosine",
                    weight_decay=0.1)


@pytest.mark.parametrize("name, world_size, shape, lr, warmup", [
    ("paper_220m.yaml", 8, (768, 12), 6e-4, 1000),
    ("paper_533m.yaml", 8, (1024, 24), 6e-4, 1000),
    ("paper_1044m.yaml", 8, (1280, 36), 6e-4, 1000),
    ("qwen3_0p6b.yaml", 8, (1024, 28), 6e-4, 1000),
    ("delta_block_7p6b.yaml", 64, (4096, 36), 3e-4, 500),
])
def test_shipped_gpu_configs(name, world_size, shape, lr, warmup):
    cfg = load_run_config(config_path(name))
    cfg.validate(world_size=world_size)
    t = cfg.training
    assert (cfg.model.hidden_size, cfg.model.num_layers) == shape
    assert {k: getattr(t, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    assert (t.lr, t.lr_warmup_iters, t.precision) == (lr, warmup, "bf16")
    assert t.min_lr == pytest.approx(lr / 10, rel=1e-12)
    assert cfg.delta.variant == "delta_block"


def test_7p6b_layout():
    cfg = load_run_config(config_path("delta_block_7p6b.yaml"))
    m, p = cfg.model, cfg.parallel
    assert (m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.seq_length) == (32, 8, 12288, 2048)
    assert (m.normalization, m.activation, m.position_embedding_type) == ("RMSNorm", "swiglu", "rope")
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size(64)) == (4, 2, 8)
    assert p.sequence_parallel and p.use_distributed_optimizer and cfg.delta.num_blocks == 4
    assert cfg.training.global_batch_size * m.seq_length == 128 * 1024  # the reference's 128K tokens/step
    with pytest.raises(RunConfigError, match="data_parallel_size"):  # launched on one 8-GPU node
        cfg.validate(world_size=8)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))), ids=os.path.basename)
def test_every_shipped_config_validates_on_its_mesh(path):
    """Each recipe passes every check for the world size it is written for (data x tensor x
    pipeline ranks; one data-parallel rank unless it pins data_parallel_size) and round-trips."""
    cfg = load_run_config(path)
    p = cfg.parallel
    world_size = (p.data_parallel_size or 1) * p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    cfg.validate(world_size=world_size)
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_parsing_and_validating_imports_no_model_data_or_tokenizer_code():
    """A planning host or a launcher checks a YAML without torch or Megatron: a fresh interpreter
    parses and validates every shipped config and has imported none of them."""
    script = (
        "import glob, sys\n"
        "from megatron_delta.run_config import load_run_config\n"
        f"for path in sorted(glob.glob({os.path.join(CONFIGS, '*.yaml')!r})):\n"
        "    cfg = load_run_config(path); p = cfg.parallel\n"
        "    cfg.validate((p.data_parallel_size or 1) * p.tensor_model_parallel_size * p.pipeline_model_parallel_size)\n"
        "heavy = ('torch', 'megatron', 'nltk', 'transformers', 'tokenizers', 'numpy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('megatron_delta.')))\n"
    )
    result = launcher.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["['megatron_delta.config',", "'megatron_delta.data_config',",
                                     "'megatron_delta.run_config']"]


def test_the_defaults_are_a_valid_run():
    """What a section left out of a YAML (or a converted checkpoint's record) gets passes every check."""
    from megatron_delta.run_config import RunConfig

    RunConfig().validate(world_size=1)


# Qwen3-0.6B's config.json (the fields the converter reads).
QWEN3_0P6B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=True,
                  vocab_size=151936, hidden_act="silu", attention_bias=False, initializer_range=0.02)


def test_finetuning_recipes_continue_the_converted_model():
    """The fine-tuning recipes load a converted checkpoint's weights only (fresh optimizer and
    schedule) into an identity-initialised additive model with fast routers; the Qwen3-0.6B one has
    exactly the model section `convert import` derives from Qwen3-0.6B's config.json."""
    from megatron_delta.convert import model_config_from_hf

    for name in ("finetune_tiny_cpu.yaml", "finetune_qwen3_0.6b_delta_block.yaml", "finetune_qwen3_30b_a3b_delta_block.yaml"):
        cfg = load_run_config(config_path(name))
        assert cfg.checkpoint.load and cfg.checkpoint.finetune, name
        assert (cfg.delta.init, cfg.delta.additive, cfg.training.router_lr_mult) == ("identity", True, 100.0), name
    qwen = load_run_config(config_path("finetune_qwen3_0.6b_delta_block.yaml"))
    converted = model_config_from_hf(QWEN3_0P6B)
    assert qwen.model == dataclasses.replace(converted, transformer_impl=qwen.model.transformer_impl)
    assert (qwen.data.tokenizer, qwen.training.precision) == ("huggingface", "bf16")


def test_vocab_padding_does_not_depend_on_the_mesh():
    """The byte tokenizer's 258 ids pad to 384 on every TP size that divides 128, so a checkpoint
    means the same model on any mesh (Megatron-LM's divisor x TP would give 512 at TP2)."""
    sizes = {tp: padded_vocab_size(load_run_config(TINY, [f"parallel.tensor_model_parallel_size={tp}"]), 258)
             for tp in (1, 2, 4, 8)}
    assert set(sizes.values()) == {384}
    assert padded_vocab_size(load_run_config(TINY, ["parallel.tensor_model_parallel_size=3"]), 258) == 384
    assert padded_vocab_size(load_run_config(TINY, ["model.vocab_size=151936"]), 258) == 151936
    with pytest.raises(RunConfigError, match="model.vocab_size"):
        load_run_config(TINY, ["model.vocab_size=1001", "parallel.tensor_model_parallel_size=2"]).validate(2)


def test_moe_fields_reach_megatron_under_their_names():
    from megatron_delta.run_config import build_transformer_config

    cfg = load_run_config(TINY_MOE, ["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                                     "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel_size=1",
                                     "model.moe_layer_freq=[1, 0, 1, 0]", "model.moe_z_loss_coeff=1e-3"])
    cfg.validate(world_size=4)
    tc = build_transformer_config(cfg, on_gpu=False)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.moe_shared_expert_intermediate_size,
            tc.moe_layer_freq, tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff) == (4, 2, 192, 192, [1, 0, 1, 0], 1e-2, 1e-3)
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size, tc.moe_token_dispatcher_type) == (
        2, 1, "alltoall")
    dense = build_transformer_config(load_run_config(TINY), on_gpu=False)
    assert dense.num_moe_experts is None and dense.mtp_num_layers is None


@pytest.mark.parametrize("overrides, world_size, named", [
    (["parallel.expert_model_parallel_size=3", "training.micro_batch_size=1", "training.global_batch_size=12"], 3,
     "num_moe_experts=4 is not divisible"),
    (["parallel.expert_model_parallel_size=2", "training.micro_batch_size=1", "training.global_batch_size=12"], 3,
     "does not divide the 3 ranks"),
    (["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"], 4, "sequence_parallel=true"),
    (["model.add_bias_linear=true"], 1, "add_bias_linear=True with num_moe_experts"),
    (["parallel.moe_token_dispatcher_type=flex"], 1, "moe_token_dispatcher_type='flex' needs DeepEP"),
])
def test_impossible_moe_runs_are_rejected_before_start(overrides, world_size, named):
    assert_rejected(TINY_MOE, overrides, world_size, named)


def test_expert_parallelism_needs_experts():
    with pytest.raises(RunConfigError, match="expert_model_parallel_size > 1 needs model.num_moe_experts"):
        load_run_config(TINY, ["parallel.expert_model_parallel_size=2"]).validate(world_size=2)
