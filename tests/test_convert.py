"""Hugging Face <-> Megatron conversion (megatron_delta.convert).

Tiny random Qwen3 (tied embeddings, q/k norms, head_dim != hidden / heads, GQA, sharded
safetensors), Llama (untied, GQA, a vocabulary that needs padding) and Qwen3-MoE models (4 experts,
top-2; renormalised top-k with a dense first layer, or softmax-then-top-k on every other layer and
untied) are built with `transformers` from a config and saved locally: nothing is downloaded.

- TP=1: the converted checkpoint, loaded into a freshly initialised model, gives the HF logits on
  the real vocabulary and the HF loss (with the zero logits of the padded classes), for standard,
  delta and delta_block; opening the gates changes them (the parity is not vacuous).
- TP=2 x PP=2: four real processes over gloo (torchrun) load the same checkpoint (converted in
  one process: dist_checkpointing reshards at load; Qwen3-MoE's experts split over TP too) and run
  Megatron's pipeline schedule.
- export -> import and import -> export are exact (bit-equal tensors), routing parameters included.
- The exported directory runs in transformers (trust_remote_code, our modeling_delta.py) for every
  routed variant, Qwen3 and Llama: its logits equal the Megatron model's and its greedy
  generate(), with and without the KV cache, equals Megatron's KV-cache generation; without
  trust_remote_code it refuses to load.
- A converted model fine-tuned by `megatron-delta train` starts at the HF model's loss (dense
  Qwen3 and Qwen3-MoE); the Qwen3-30B-A3B recipe's model section is the converter's.

Run this file as a script under torchrun for the mesh worker (see test_tp2_pp2_mesh_...).
"""

import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state

from megatron_delta import DeltaResidualConfig, convert, pipeline_seq_length
from megatron_delta.run_config import ModelConfig, load_run_config

import launcher
from launcher import REPO
SEQ, BATCH, MICRO_BATCH = 16, 4, 2
TOLERANCE = 1e-5  # relative (max |diff| / max |reference|), fp32; observed <= 1e-6

# name -> (transformers config class, kwargs, save_pretrained max_shard_size)
HF_MODELS = {
    "qwen3": ("Qwen3Config", dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.05,
    ), "40KB"),
    "llama": ("LlamaConfig", dict(
        vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=50000.0, initializer_range=0.05,
    ), "10GB"),
    # Qwen3-MoE: the tiny Qwen3's attention; layer 0 dense (mlp_only_layers), layers 1-3 MoE with
    # norm_topk_prob (Megatron's top-k then softmax).
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.05,
    ), "40KB"),
    # Without norm_topk_prob (Megatron's moe_router_pre_softmax), MoE on every other layer, untied.
    "qwen3_moe_pre_softmax": ("Qwen3MoeConfig", dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.05,
    ), "10GB"),
}
HF_CLASSES = {"qwen3": "Qwen3", "llama": "Llama", "qwen3_moe": "Qwen3Moe"}  # our exported class: Delta<this>ForCausalLM
HF_MODULES = {}  # name -> the transformers module, filled by the hf_models fixture
# Qwen3-0.6B's config.json (for the fine-tuning recipe's model section).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# Qwen3-30B-A3B's config.json (for the MoE fine-tuning recipe's model section).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def reference_ce(logits: torch.Tensor, labels: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Per-token cross entropy of HF logits over the padded vocabulary (padded classes: logit 0)."""
    padded = torch.nn.functional.pad(logits.double(), (0, padded_vocab - logits.shape[-1]))
    per_token = torch.nn.functional.cross_entropy(padded.flatten(0, 1), labels.flatten(), reduction="none")
    return per_token.view(labels.shape)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{name: directory} of the tiny HF models; each holds reference.pt: tokens, labels, HF logits.
    The modules go to HF_MODULES: from_pretrained is not used, because under cpu_shim it leaves the
    rotary inv_freq buffer of transformers 5 models uninitialised."""
    import transformers

    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for seed, (name, (config_class, kwargs, shard_size)) in enumerate(HF_MODELS.items()):
        torch.manual_seed(seed)
        config = getattr(transformers, config_class)(**kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms initialise to 1: make them distinct, so a swapped norm shows
            for param_name, param in model.named_parameters():
                if "norm" in param_name:
                    param.copy_(1 + 0.3 * torch.randn_like(param))
                if param_name.endswith("mlp.gate.weight"):  # MoE routers: well-separated top-k choices
                    param.normal_(0.0, 1.0)
        path = root / name
        model.save_pretrained(path, max_shard_size=shard_size)
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
        tokens, labels = ids[:, :-1], ids[:, 1:]
        with torch.no_grad():
            logits = model(tokens).logits
        torch.save({"tokens": tokens, "labels": labels, "logits": logits}, path / "reference.pt")
        dirs[name] = str(path)
        HF_MODULES[name] = model
    return dirs


def load_converted(checkpoint: str, seed: int = 99):
    """A fresh TP=1 model (its own random init) with the checkpoint loaded, in eval mode."""
    record = json.load(open(os.path.join(checkpoint, convert.CONVERSION_FILE)))
    model = convert.build_model(
        ModelConfig(**record["model"]), DeltaResidualConfig(**record["delta"]),
        convert.transformer_config_from_hf(record["hf_config"]), seed=seed,
    )
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)
    model.load_state_dict(loaded["model"])
    return model.eval()


def forward(model, tokens, labels=None):
    position_ids = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, position_ids, None, labels=labels)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------- layout

def test_qkv_weight_interleaves_query_groups_like_megatron():
    """4 query heads in 2 groups, head dim 3: rows [q0 q1 k0 v0 | q2 q3 k1 v1] (the classic bug is
    [q0..q3 k0 k1 v0 v1])."""
    layout = convert.WeightLayout(num_layers=1, hidden_size=5, num_heads=4, num_query_groups=2, head_dim=3,
                                  vocab_size=8, padded_vocab_size=8, tied=True, qk_layernorm=False)

    def labelled(kind, heads):  # row r of head h of kind k: value 100 k + 10 h + r
        return torch.stack([torch.full((5,), 100.0 * kind + 10 * h + r) for h in range(heads) for r in range(3)])

    q, k, v = labelled(1, 4), labelled(2, 2), labelled(3, 2)
    qkv = convert.interleave_qkv(q, k, v, layout)
    expected = [(1, 0), (1, 1), (2, 0), (3, 0), (1, 2), (1, 3), (2, 1), (3, 1)]
    assert qkv[:, 0].tolist() == [100.0 * kind + 10 * h + r for kind, h in expected for r in range(3)]
    for ours, original in zip(convert.split_qkv(qkv, layout), (q, k, v)):
        assert torch.equal(ours, original)


def test_qwen3_0_6b_config_gives_the_recipe_model_section():
    """The fine-tuning recipe's model section is what the converter derives from Qwen3-0.6B."""
    derived = dataclasses.asdict(convert.model_config_from_hf(QWEN3_0_6B))
    recipe = load_run_config(os.path.join(REPO, "examples/configs/finetune_qwen3_0.6b_delta_block.yaml"))
    assert dataclasses.asdict(recipe.model) == derived
    assert derived["kv_channels"] == 128 and derived["vocab_size"] == 151936  # head_dim, no padding needed
    assert recipe.delta == DeltaResidualConfig(variant="delta_block", num_blocks=4, init="identity")
    assert recipe.training.router_lr_mult == 100.0
    recipe.validate(world_size=8)
    convert.check_layout(recipe.model, recipe.delta, 2, 2, None)  # 8 kv heads and 28 layers fit TP2 x PP2


def test_qwen3_30b_a3b_config_gives_the_moe_recipe_model_section():
    """The MoE fine-tuning recipe's model section is what the converter derives from Qwen3-30B-A3B,
    and its mesh (TP2 x PP2 x DP4, EP8) passes the trainer's and Megatron's checks on 16 ranks."""
    derived = dataclasses.asdict(convert.model_config_from_hf(QWEN3_30B_A3B))
    recipe = load_run_config(os.path.join(REPO, "examples/configs/finetune_qwen3_30b_a3b_delta_block.yaml"))
    assert dataclasses.asdict(recipe.model) == derived
    assert (derived["num_moe_experts"], derived["moe_router_topk"], derived["moe_ffn_hidden_size"],
            derived["moe_layer_freq"], derived["moe_router_pre_softmax"]) == (128, 8, 768, 1, False)
    assert recipe.delta == DeltaResidualConfig(variant="delta_block", num_blocks=4, init="identity")
    assert recipe.parallel.expert_model_parallel_size == 8
    recipe.validate(world_size=16)
    convert.check_layout(recipe.model, recipe.delta, 2, 2, None)


# ---------------------------------------------------------------------------------------------- TP=1 parity

@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize("variant", ["standard", "delta", "delta_block"])
def test_converted_model_computes_the_hf_logits_and_loss(hf_models, tmp_path, name, variant):
    checkpoint = str(tmp_path / "ckpt")
    assert convert.main(["import", "--hf-dir", hf_models[name], "--output", checkpoint, "--variant", variant,
                         "--num-blocks", "2", "--tp", "2", "--pp", "2"]) == 0
    reference = torch.load(os.path.join(hf_models[name], "reference.pt"))
    model = load_converted(checkpoint)
    vocab = reference["logits"].shape[-1]
    padded_vocab = model.vocab_size
    assert padded_vocab == 384  # qwen3: 384 already a multiple of 128; llama: 300 padded to 384

    logits = forward(model, reference["tokens"])
    assert relative_error(logits[..., :vocab], reference["logits"]) < TOLERANCE
    assert torch.equal(logits[..., vocab:], torch.zeros_like(logits[..., vocab:]))  # padded rows are zero
    loss = forward(model, reference["tokens"], reference["labels"])
    assert relative_error(loss, reference_ce(reference["logits"], reference["labels"], padded_vocab)) < TOLERANCE

    gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
    assert len(gates) == (0 if variant == "standard" else 2 * 4) and all(g.item() == 0.0 for g in gates)


def test_open_gates_change_the_logits(hf_models, tmp_path):
    """The routing is live in the converted model: a gate of 1 moves the logits far beyond the tolerance."""
    checkpoint = str(tmp_path / "ckpt")
    convert.import_hf(hf_models["qwen3"], checkpoint, DeltaResidualConfig("delta_block", 2, init="identity"))
    reference = torch.load(os.path.join(hf_models["qwen3"], "reference.pt"))
    model = load_converted(checkpoint)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.fill_(1.0)
    assert relative_error(forward(model, reference["tokens"]), reference["logits"]) > 1e-2


# ---------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name, variant", [("qwen3", "delta_block"), ("llama", "delta"), ("qwen3_moe", "delta_block")])
def test_export_import_round_trips_are_exact(hf_models, tmp_path, name, variant):
    source = hf_models[name]
    first = str(tmp_path / "first")
    convert.import_hf(source, first, DeltaResidualConfig(variant, 2, init="identity"))

    # import -> export gives back the original HF tensors, bit for bit (dtype included).
    exported = str(tmp_path / "exported")
    assert convert.main(["export", "--checkpoint", first, "--output", exported, "--hf-dir", source,
                         "--max-shard-size", "40KB"]) == 0
    original, back = convert.read_hf_weights(source), convert.read_hf_weights(exported)
    routing = {key: back.pop(key) for key in list(back) if "_router." in key}
    assert len(routing) == 4 * 2 * 3 and all(routing[k].dtype == torch.float32 for k in routing)
    assert all(torch.equal(t, torch.zeros(1)) for k, t in routing.items() if k.endswith(".gate"))  # identity init
    assert original.keys() == back.keys()
    for key in original:
        assert original[key].dtype == back[key].dtype and torch.equal(original[key], back[key]), key
    config = json.load(open(os.path.join(exported, "config.json")))
    source_config = json.load(open(os.path.join(source, "config.json")))
    assert config == convert.routed_hf_config(source_config, DeltaResidualConfig(variant, 2, init="identity"))
    assert config["model_type"] == f"delta_{name}" and config["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_delta.")
    assert os.path.exists(os.path.join(exported, convert.HF_INDEX))  # sharded above 40KB

    # A "trained" checkpoint (every routing parameter moved off its init) -> export -> import.
    model = load_converted(first)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (1.0 if "router" in param_name else 0.01))
    trained = str(tmp_path / "trained")
    os.makedirs(trained)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, trained)
    json.dump(json.load(open(os.path.join(first, convert.CONVERSION_FILE))),
              open(os.path.join(trained, convert.CONVERSION_FILE), "w"))
    trained_hf, again = str(tmp_path / "trained_hf"), str(tmp_path / "again")
    written = convert.export_hf(trained, trained_hf)  # no --hf-dir: the conversion record has the config
    assert {"config.json", "configuration_delta.py", "modeling_delta.py"} <= set(written)
    delta = json.load(open(os.path.join(trained_hf, "config.json")))["delta"]
    assert (delta["variant"], delta["num_blocks"], delta["init"]) == (variant, 2, "identity")
    routing_keys = {key for key in convert.read_hf_weights(trained_hf) if "_router." in key}
    assert routing_keys == {f"model.layers.{i}.{sub}_router.{p}" for i in range(4) for sub in ("attention", "mlp")
                            for p in ("query", "key_norm_weight", "gate")}
    convert.import_hf(trained_hf, again)  # variant (config.json) and routing parameters (weights) read back
    restored = load_converted(again, seed=5)
    vocab = original["model.embed_tokens.weight"].shape[0]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), restored.named_parameters()):
        assert n1 == n2
        if n1 in ("embedding.word_embeddings.weight", "output_layer.weight"):
            # The padding rows are no part of the HF vocabulary: not exported, zero again.
            assert torch.equal(p2[vocab:], torch.zeros_like(p2[vocab:])), n1
            p1, p2 = p1[:vocab], p2[:vocab]
        assert torch.equal(p1, p2), n1


# ---------------------------------------------------------------------------------------------- transformers runs the export

def trained_checkpoint(hf_dir: str, delta: DeltaResidualConfig, path: str):
    """A dist-checkpoint of the HF model's weights under `delta`, its routing moved far off the
    init (live gates, sharp queries), with the conversion record export reads; returns the model."""
    hf_config = convert.read_hf_config(hf_dir)
    model_cfg = convert.model_config_from_hf(hf_config)
    model = convert.build_model(model_cfg, delta, convert.transformer_config_from_hf(hf_config))
    convert.load_weights_into(model, convert.hf_to_megatron(convert.read_hf_weights(hf_dir),
                                                    convert.WeightLayout.of(model_cfg, hf_config["vocab_size"])))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.copy_(torch.randn(param.shape, generator=g) * (0.5 if name.endswith(".query") else 0.3)
                            + (1.0 if name.endswith("key_norm_weight") else 0.0))
    os.makedirs(path)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    record = {"source": hf_dir, "model": dataclasses.asdict(model_cfg), "delta": dataclasses.asdict(delta),
              "hf_config": hf_config}
    json.dump(record, open(os.path.join(path, convert.CONVERSION_FILE), "w"))
    return model.eval()


@pytest.mark.parametrize("name, variant", [("qwen3", "delta"), ("qwen3", "attnres_block"),
                                           ("llama", "delta_block"), ("llama", "attnres_full"),
                                           ("qwen3_moe", "delta_block"), ("qwen3_moe_pre_softmax", "attnres_full")])
def test_exported_directory_runs_in_transformers(hf_models, tmp_path, name, variant):
    import transformers

    from megatron_delta.generate import Sampling, generate_tokens

    delta = DeltaResidualConfig(variant, 2, init="identity" if variant in convert.IMPORT_VARIANTS else "reference")
    model = trained_checkpoint(hf_models[name], delta, str(tmp_path / "ckpt"))
    exported = str(tmp_path / f"{name}_{variant}")
    assert convert.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", exported]) == 0

    with pytest.raises(ValueError, match="trust_remote_code"):  # never a plain Qwen3 / Llama without routing
        transformers.AutoModelForCausalLM.from_pretrained(exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    family = convert.read_hf_config(hf_models[name])["model_type"]
    assert type(hf).__name__ == f"Delta{HF_CLASSES[family]}ForCausalLM"

    reference = torch.load(os.path.join(hf_models[name], "reference.pt"))
    vocab = reference["logits"].shape[-1]
    with torch.no_grad():
        theirs = hf(reference["tokens"]).logits
    ours = forward(model, reference["tokens"])[..., :vocab]
    assert relative_error(theirs, ours) < TOLERANCE
    assert relative_error(theirs, reference["logits"]) > 1e-2  # the routing changed the model

    eos = hf.config.eos_token_id
    prompt = reference["tokens"][:1, :6]
    ours = generate_tokens(model, prompt.tolist(), 24, Sampling(), vocab, eos)[0]
    assert len(set(ours)) > 2, ours
    for use_cache in (True, False):
        out = hf.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=use_cache)[0, 6:].tolist()
        assert (out[: out.index(eos)] if eos in out else out) == ours, use_cache

    # transformers' save_pretrained writes the exported tensors back under the same names (Qwen3-MoE:
    # one tensor per expert, though transformers holds them fused in memory).
    hf.save_pretrained(tmp_path / "resaved")
    exported_tensors, resaved = convert.read_hf_weights(exported), convert.read_hf_weights(str(tmp_path / "resaved"))
    assert exported_tensors.keys() == resaved.keys()
    assert all(torch.equal(exported_tensors[key], resaved[key]) for key in resaved)

    # import(export(checkpoint)) gives back every parameter, routing included, bit for bit.
    again = str(tmp_path / "again")
    convert.import_hf(exported, again)
    restored = load_converted(again, seed=5)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), restored.named_parameters()):
        assert n1 == n2 and torch.equal(p1[:vocab] if "word_embeddings" in n1 or "output_layer" in n1 else p1,
                                        p2[:vocab] if "word_embeddings" in n2 or "output_layer" in n2 else p2), n1


# ---------------------------------------------------------------------------------------------- bad input

def edited_copy(source: str, tmp_path, **changes) -> str:
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(source, path)
    config = json.load(open(path / "config.json"))
    config.update(changes)
    json.dump(config, open(path / "config.json", "w"))
    return str(path)


@pytest.mark.parametrize("changes, args, message", [
    (dict(model_type="mistral"), [], "model_type='mistral' is not supported"),
    (dict(attention_bias=True), [], "attention_bias=True: q/k/v/o biases are not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), [],
     "rope_type='llama3' is not supported"),
    ({}, ["--tp", "3"], "is not divisible by --tp 3"),
    ({}, ["--pp", "3"], "num_hidden_layers=4 is not divisible by --pp x --vpp = 3 x 1"),
    ({}, ["--variant", "attnres_block"], "--variant attnres_block (init='reference') cannot start from a pretrained"),
    ({}, ["--variant", "delta_block", "--num-blocks", "3"], "delta.num_blocks=3 with num_layers=4"),
])
def test_bad_input_fails_early_with_one_line(hf_models, tmp_path, capsys, changes, args, message):
    hf_dir = edited_copy(hf_models["qwen3"], tmp_path, **changes)
    output = str(tmp_path / "out")
    assert convert.main(["import", "--hf-dir", hf_dir, "--output", output, *args]) == 2
    stderr = capsys.readouterr().err.splitlines()
    errors = [line for line in stderr if line.startswith("megatron-delta convert: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not os.path.exists(output)


def test_from_scratch_model_section_gives_a_hf_config_and_back():
    """hf_config_from_model inverts model_config_from_hf (Qwen3 with q/k norms, else Llama), and
    refuses what a Qwen3 / Llama config cannot express."""
    for qk in (True, False):
        model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=96, seq_length=128, qk_layernorm=qk, rotary_base=50000, norm_epsilon=1e-6)
        hf_config = convert.hf_config_from_model(model, vocab_size=258, eos_token_id=256)
        assert hf_config["model_type"] == ("qwen3" if qk else "llama")
        back = convert.model_config_from_hf(hf_config)
        assert convert.architecture(back) == convert.architecture(model) and back.norm_epsilon == 1e-6
    for field, value in [("normalization", "LayerNorm"), ("activation", "gelu"),
                         ("position_embedding_type", "learned_absolute"), ("add_bias_linear", True)]:
        with pytest.raises(convert.ConvertError, match=f"model.{field}="):
            convert.hf_config_from_model(dataclasses.replace(ModelConfig(), **{field: value}), vocab_size=258)

    # With experts: Qwen3-MoE, the dense layers as mlp_only_layers, and what Qwen3-MoE cannot hold refused.
    moe = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, qk_layernorm=True,
                      num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=2,
                      moe_router_pre_softmax=True)
    hf_config = convert.hf_config_from_model(moe, vocab_size=258)
    assert (hf_config["model_type"], hf_config["mlp_only_layers"], hf_config["norm_topk_prob"]) == \
        ("qwen3_moe", [1, 3], False)
    back = convert.model_config_from_hf(hf_config)
    assert back.moe_layer_freq == [1, 0, 1, 0] and convert.architecture(back) == convert.architecture(moe)
    for field, value in [("moe_shared_expert_intermediate_size", 64), ("moe_router_score_function", "sigmoid"),
                         ("moe_router_enable_expert_bias", True), ("qk_layernorm", False)]:
        with pytest.raises(convert.ConvertError, match=f"model.{field}=.*no Hugging Face Qwen3-MoE counterpart"):
            convert.hf_config_from_model(dataclasses.replace(moe, **{field: value}), vocab_size=258)


@pytest.mark.parametrize("changes, args, message", [
    (dict(num_experts=0), [], "num_experts=0: a Qwen3-MoE model needs experts"),
    (dict(moe_intermediate_size=33), ["--tp", "2"], "moe_intermediate_size=33 is not divisible by --tp 2"),
    (dict(num_experts=3), [], "tensors with no Megatron counterpart: model.layers.1.mlp.experts.3.down_proj.weight"),
])
def test_bad_moe_input_fails_early_with_one_line(hf_models, tmp_path, capsys, changes, args, message):
    hf_dir = edited_copy(hf_models["qwen3_moe"], tmp_path, **changes)
    output = str(tmp_path / "out")
    assert convert.main(["import", "--hf-dir", hf_dir, "--output", output, *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("megatron-delta convert: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not os.path.exists(output)


def test_existing_output_is_not_overwritten(hf_models, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep").write_text("x")
    with pytest.raises(convert.ConvertError, match="exists and is not empty"):
        convert.import_hf(hf_models["qwen3"], str(output))


# ---------------------------------------------------------------------------------------------- TP2 x PP2

def test_tp2_pp2_mesh_loads_the_one_process_checkpoint(hf_models, tmp_path):
    """Converted once, in one process; loaded by 4 torchrun ranks (TP=2 x PP=2) whose pipeline
    schedule (forward_only, seq_length=pipeline_seq_length) gives the HF logits and loss."""
    cases = []
    for name, variant in (("qwen3", "delta_block"), ("llama", "delta"), ("qwen3_moe", "delta_block")):
        checkpoint = str(tmp_path / f"{name}_{variant}")
        convert.import_hf(hf_models[name], checkpoint, DeltaResidualConfig(variant, 2, init="identity"),
                          tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
        cases.append({"name": f"{name}/{variant}", "checkpoint": checkpoint,
                      "reference": os.path.join(hf_models[name], "reference.pt")})
    out = tmp_path / "results"
    out.mkdir()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = launcher.torchrun(4, os.path.abspath(__file__), "--mesh-worker", str(out), str(tmp_path / "cases.json"),
                               timeout=400, merge_output=True)
    log = result.stdout
    assert result.returncode == 0, "\n".join([log[-3000:], "errors:"] + [l for l in log.splitlines() if "Error" in l])
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    last_stage = [r for r in results if r["last_stage"]]
    assert len(last_stage) == 2  # the two TP ranks of pipeline stage 1
    for result in last_stage:
        for case in cases:
            errors = result["errors"][case["name"]]
            assert errors["logits"] < TOLERANCE and errors["loss"] < TOLERANCE, (case["name"], errors)
            assert errors["padded_logits"] == 0.0


def _mesh_worker(out_dir: str, cases_file: str) -> None:
    """One rank of the TP=2 x PP=2 run (launched by torchrun)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_delta import mesh

    mesh.start_world()  # a process of its own (the CPU shim: tests/conftest.py does not run here)
    rank = dist.get_rank()
    errors = {}
    for case in json.load(open(cases_file)):
        record = json.load(open(os.path.join(case["checkpoint"], convert.CONVERSION_FILE)))
        delta = DeltaResidualConfig(**record["delta"])
        mesh.init_model_parallel(tp=2, pp=2)
        config = convert.transformer_config_from_hf(record["hf_config"], 2, 2)
        model = convert.build_model(
            ModelConfig(**record["model"]), delta, config, seed=99,
            pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        )
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, case["checkpoint"])
        model.load_state_dict(loaded["model"])
        model.eval()
        reference = torch.load(case["reference"])
        microbatches = [{key: reference[key][i:i + MICRO_BATCH] for key in ("tokens", "labels")}
                        for i in range(0, BATCH, MICRO_BATCH)]

        def run_schedule(with_labels: bool):
            def forward_step(data_iterator, chunk):
                batch = next(data_iterator)
                position_ids = torch.arange(SEQ).expand(MICRO_BATCH, -1)
                output = chunk(batch["tokens"], position_ids, None, labels=batch["labels"] if with_labels else None)

                def collect(output):
                    # Per-token losses as they are; logits are split over TP ranks along the vocabulary.
                    full = output if with_labels else gather_from_tensor_model_parallel_region(output)
                    return output.sum() * 0.0, {"out": full.detach().clone()}

                return output, collect

            with torch.no_grad():
                reported = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
                    num_microbatches=len(microbatches), seq_length=pipeline_seq_length(delta, config, SEQ),
                    micro_batch_size=MICRO_BATCH, forward_only=True,
                )
            return torch.cat([item["out"] for item in reported]) if reported else None

        logits, loss = run_schedule(with_labels=False), run_schedule(with_labels=True)
        if parallel_state.is_pipeline_last_stage():
            vocab = reference["logits"].shape[-1]
            expected_loss = reference_ce(reference["logits"], reference["labels"], logits.shape[-1])
            errors[case["name"]] = {
                "logits": relative_error(logits[..., :vocab], reference["logits"]),
                "padded_logits": logits[..., vocab:].abs().max().item() if logits.shape[-1] > vocab else 0.0,
                "loss": relative_error(loss, expected_loss),
            }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"last_stage": bool(errors), "errors": errors}, f)
    dist.barrier()
    mesh.stop_world()


# ---------------------------------------------------------------------------------------------- fine-tuning

# The tiny Qwen3-MoE is the tiny Qwen3 plus these model fields (its conversion record says so).
MOE_RECIPE_OVERRIDES = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
                        "model.moe_layer_freq=[0, 1, 1, 1]", "model.moe_aux_loss_coeff=0.001"]


@pytest.mark.parametrize("name, nproc", [("qwen3", 1), ("qwen3_moe", 1), ("qwen3_moe", 2)],
                         ids=["qwen3", "qwen3_moe", "qwen3_moe_ep2"])
def test_finetuning_a_converted_model_starts_at_the_hf_loss(hf_models, tmp_path, name, nproc):
    """`megatron-delta train` on examples/configs/finetune_tiny_cpu.yaml with the converted tiny
    Qwen3 (Qwen3-MoE: with the MoE model fields set; on two ranks with the experts split over
    them, EP2: each loads its half of the one-process checkpoint's experts): the loss of step 1
    (computed before the first update) equals the HF model's loss on the same global batch; the
    loss goes down; the routing parameters train; the result exports back to HF layout."""
    from megatron_delta.data import build_datasets, build_tokenizer

    checkpoint = str(tmp_path / "converted")
    assert convert.main(["import", "--hf-dir", hf_models[name], "--output", checkpoint, "--variant",
                         "delta_block", "--num-blocks", "2"]) == 0
    recipe = os.path.join(REPO, "examples/configs/finetune_tiny_cpu.yaml")
    overrides = [f"checkpoint.load={checkpoint}", f"logging.dir={tmp_path / 'run'}",
                 f"data.cache_dir={tmp_path / 'data'}", *(MOE_RECIPE_OVERRIDES if name == "qwen3_moe" else []),
                 *([f"parallel.expert_model_parallel_size={nproc}"] if nproc > 1 else [])]
    cfg = load_run_config(recipe, overrides)
    # The recipe's model section is the converted model's.
    assert dataclasses.asdict(cfg.model) | {"seq_length": 0} == json.load(
        open(os.path.join(checkpoint, convert.CONVERSION_FILE)))["model"] | {"seq_length": 0}

    train = ["train", "--config", recipe, *[arg for item in overrides for arg in ("--set", item)]]
    command = launcher.cli_command(*train) if nproc == 1 else launcher.torchrun_command(nproc, "-m", "megatron_delta.cli",
                                                                                          *train)
    run = launcher.run(command, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ("dp 2 ep 2 on 2 CPU process(es)" if nproc == 2 else "dp 1 on 1 CPU process(es)") in run.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    first_loss = next(m["loss"] for m in metrics if m["step"] == 1 and "loss" in m)
    assert len(losses) == 3 and losses[-1] < first_loss, losses
    # observed: qwen3 6.099 -> 5.834, qwen3_moe 5.907 -> 5.699
    if name == "qwen3_moe":  # the trainer ran Megatron's MoE layers: it logged their expert load
        assert all(len(m["expert_load"]) == 3 for m in metrics if "loss" in m)

    t = cfg.training
    eval_samples = t.eval_iters * t.global_batch_size
    train_set, _, _ = build_datasets(cfg.data, build_tokenizer(cfg.data), cfg.model.seq_length,
                                     (t.train_iters * t.global_batch_size, eval_samples, eval_samples), t.seed)
    batch = [train_set[i] for i in range(t.global_batch_size)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in batch]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in batch]).long()
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in batch]).double()
    with torch.no_grad():
        logits = HF_MODULES[name](tokens).logits
    hf_loss = (reference_ce(logits, labels, cfg.model.vocab_size) * mask).sum() / mask.sum()
    assert abs(first_loss - hf_loss.item()) / hf_loss.item() < TOLERANCE, (first_loss, hf_loss.item())

    # The trainer's checkpoint (iteration 3) exports to HF layout with trained, nonzero gates.
    exported = str(tmp_path / "exported")
    convert.export_hf(str(tmp_path / "run" / "checkpoints"), exported, hf_dir=hf_models[name])
    gates = [v for k, v in convert.read_hf_weights(exported).items() if k.endswith(".gate")]
    assert len(gates) == 8 and all(g.abs().item() > 0 for g in gates)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--mesh-worker"]:
        _mesh_worker(*sys.argv[2:4])
