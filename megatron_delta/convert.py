"""`megatron-delta convert`: Hugging Face Qwen3 / Llama checkpoints <-> Megatron dist-checkpoints
of a DeltaGPTModel.

    megatron-delta convert import --hf-dir Qwen3-0.6B --output ckpt/qwen3-0.6b-delta-block \\
        --variant delta_block --num-blocks 4 [--tp 2 --pp 2]
    megatron-delta convert export --checkpoint runs/ft/checkpoints --output qwen3-0.6b-delta-block-hf \\
        [--hf-dir Qwen3-0.6B]

import: reads config.json and model.safetensors (or the shards listed in model.safetensors.index.json;
    nothing is downloaded, `transformers` is not needed), builds the model once in this process
    (TP=1, PP=1, fp32, CPU), copies the weights in and writes
    `dist_checkpointing.save({"model": model.sharded_state_dict()}, OUTPUT)`, the trainer's
    checkpoint layout. A dist-checkpoint holds global (unsharded, layer-stacked) tensors and is
    resharded when loaded, so any TP x PP x VPP mesh loads it; --tp/--pp/--vpp only check that the
    target layout can hold this model. The routing parameters start at init="identity": a zero
    gate on the routed term makes `delta` and `delta_block` compute exactly the Hugging Face
    model's logits (on the real vocabulary, see below). OUTPUT/conversion.json records the source
    config, the trainer's `model:` section and the `delta:` section.

export: loads a checkpoint (one written by import, or a trainer checkpoint: iter_XXXXXXX/ or the
    checkpoint directory holding `latest`) into the same one-process model and writes a Hugging
    Face directory that transformers runs: the weights in HF layout and in the original dtype
    (sharded like save_pretrained above --max-shard-size), the tokenizer and generation files,
    and config.json. A routed model's directory also holds our model code (megatron_delta/hf:
    configuration_delta.py, modeling_delta.py; torch + transformers only), which its config.json
    names in `auto_map`:

        model_type     delta_qwen3 / delta_llama (unknown to transformers: loading the directory
                       without trust_remote_code=True fails instead of dropping the routing)
        delta          variant, num_blocks, init, norm_epsilon
        weights        + model.layers.{i}.{attention,mlp}_router.{query,key_norm_weight[,gate]} (fp32;
                       gate for init="identity") and model.final_router.* (replacement variants)

        AutoModelForCausalLM.from_pretrained(OUTPUT, trust_remote_code=True)

    The config of a model trained from scratch (no Hugging Face source) is derived from the
    trainer's model section: Qwen3 with q/k norms, else Llama (RMSNorm, SwiGLU, RoPE, no biases);
    its tokenizer files are data.tokenizer_path's, or the byte tokenizer's written as a Hugging
    Face tokenizer (ids = bytes, <eod> 256, <pad> 257).
    Importing an exported directory reads the routing back: export and import are exact inverses
    (the vocabulary-padding rows, no part of the HF model, are not exported and come back as zeros).

Weight mapping (layer i; Megatron names are the local spec's, TE checkpoints use the same keys):

    model.embed_tokens.weight                    embedding.word_embeddings.weight (rows padded with zeros)
    model.layers.i.input_layernorm.weight        decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight decoder.layers.i.self_attention.linear_qkv.weight,
                                                 per query group g: [q heads of g, k_g, v_g]
    model.layers.i.self_attn.o_proj.weight       decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.self_attn.{q,k}_norm.weight   decoder.layers.i.self_attention.{q,k}_layernorm.weight (Qwen3)
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight     decoder.layers.i.mlp.linear_fc1.weight = cat[gate, up]
    model.layers.i.mlp.down_proj.weight          decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                            decoder.final_layernorm.weight
    lm_head.weight (untied models)               output_layer.weight (rows padded with zeros)

Vocabulary padding: the embedding (and output layer) get zero rows up to a multiple of
--make-vocab-size-divisible-by (default 128, so TP up to 128 can split it; 1 disables padding).
A padded class has logit exactly 0; Megatron's loss normalises over the padded vocabulary too, so
the converted model's loss equals the HF model's loss with those zero logits appended (a
difference of log(1 + P / sum_v exp(logit_v)) per token; none when the HF vocabulary is already
a multiple, as Qwen3's 151936 is of 128).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys

import torch
import yaml

from megatron_delta import hf as hf_model_code
from megatron_delta.config import DeltaConfigError, DeltaResidualConfig, check_pipeline_split
from megatron_delta.parameters import is_routing_parameter
from megatron_delta.run_config import (
    ModelConfig,
    ParallelConfig,
    RunConfig,
    RunConfigError,
    build_model_chunk,
    build_transformer_config,
)

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
# our exported model types -> the family they extend
ROUTED_MODEL_TYPES = {model_type: family for family, (model_type, _, _) in hf_model_code.FAMILIES.items()}
IMPORT_VARIANTS = ("standard", "delta", "delta_block")  # the variants with an identity init
CONVERSION_FILE = "conversion.json"  # written next to an imported dist-checkpoint
HF_INDEX = "model.safetensors.index.json"
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Per-layer tensors that map one to one (HF name -> Megatron name, relative to the layer).
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
QK_NORM_RENAMES = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


class ConvertError(ValueError):
    """A checkpoint or option the converter cannot handle; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Hugging Face config -> the trainer's model section and Megatron's TransformerConfig


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"--hf-dir {hf_dir}: no config.json; point it at a local Hugging Face model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rope(hf_config: dict) -> tuple[float, str]:
    """(rope_theta, rope_type) from a transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) config."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = hf_config.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, rope_type


def model_config_from_hf(hf_config: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The `model:` section of a run config (megatron_delta.run_config.ModelConfig) that builds the
    Megatron equivalent of a Hugging Face Qwen3 / Llama config (config.json as a dict).

    vocab_size is the padded vocabulary the converted checkpoint holds; a fine-tuning run must
    use exactly this value (it does not depend on the TP size, unlike the trainer's default)."""
    model_type = hf_config.get("model_type")
    family = ROUTED_MODEL_TYPES.get(model_type, model_type)
    if family not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(
            f"config.json model_type={model_type!r} is not supported; the converter handles "
            f"{', '.join(SUPPORTED_MODEL_TYPES + tuple(ROUTED_MODEL_TYPES))}"
        )
    unsupported = {
        "hidden_act": (hf_config.get("hidden_act", "silu") != "silu", "only silu (SwiGLU MLP) is supported"),
        "attention_bias": (bool(hf_config.get("attention_bias")), "q/k/v/o biases are not supported"),
        "mlp_bias": (bool(hf_config.get("mlp_bias")), "MLP biases are not supported"),
        "use_sliding_window": (bool(hf_config.get("use_sliding_window")), "sliding-window attention is not supported"),
        "partial_rotary_factor": (hf_config.get("partial_rotary_factor", 1.0) != 1.0,
                                  "rotary embedding on part of the head is not supported"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            raise ConvertError(f"config.json {field}={hf_config.get(field)!r}: {why} by the converter")
    theta, rope_type = _rope(hf_config)
    if rope_type != "default":
        raise ConvertError(
            f"config.json rope scaling rope_type={rope_type!r} is not supported (the trainer's model "
            f"section has no RoPE scaling); only plain RoPE (rope_type 'default') converts"
        )
    if float(theta) != int(theta):
        raise ConvertError(f"config.json rope_theta={theta!r}: the trainer's model.rotary_base is an integer")
    if not (isinstance(make_vocab_size_divisible_by, int) and make_vocab_size_divisible_by >= 1):
        raise ConvertError(f"--make-vocab-size-divisible-by={make_vocab_size_divisible_by!r} must be an integer >= 1")

    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    if hf_config.get("head_dim") is None and hidden % heads:
        raise ConvertError(f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    vocab = hf_config["vocab_size"]
    max_positions = hf_config["max_position_embeddings"]
    return ModelConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        kv_channels=hf_config.get("head_dim") or hidden // heads,
        seq_length=min(max_positions, 2048),
        max_position_embeddings=max_positions,
        vocab_size=math.ceil(vocab / make_vocab_size_divisible_by) * make_vocab_size_divisible_by,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        normalization="RMSNorm",
        norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        qk_layernorm=family == "qwen3",
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
        init_method_std=hf_config.get("initializer_range", 0.02),
        hidden_dropout=0.0,
        attention_dropout=hf_config.get("attention_dropout", 0.0),
        transformer_impl="local",
    )


def hf_config_from_model(model: ModelConfig, vocab_size: int, eos_token_id: int | None = None) -> dict:
    """config.json of a model trained from scratch: Qwen3 when it has q/k norms, else Llama; the
    inverse of model_config_from_hf (checked by a round trip). `vocab_size`: the tokenizer's."""
    unsupported = {
        "normalization": model.normalization != "RMSNorm",
        "activation": model.activation != "swiglu",
        "position_embedding_type": model.position_embedding_type != "rope",
        "add_bias_linear": model.add_bias_linear,
    }
    for field, bad in unsupported.items():
        if bad:
            raise ConvertError(
                f"model.{field}={getattr(model, field)!r}: a Hugging Face Qwen3 / Llama model needs RMSNorm, "
                f"swiglu, rope and no linear biases"
            )
    family = "qwen3" if model.qk_layernorm else "llama"
    return {
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size or 4 * model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.kv_channels or model.hidden_size // model.num_attention_heads,
        "max_position_embeddings": model.max_position_embeddings or model.seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": model.attention_dropout,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "initializer_range": model.init_method_std,
        "eos_token_id": eos_token_id,
        "dtype": "float32",
    }


def routed_hf_config(hf_config: dict, delta: DeltaResidualConfig) -> dict:
    """The config.json of a routed model: the family's config with our model type, the routing and
    the auto_map naming the model code copied next to it."""
    family = ROUTED_MODEL_TYPES.get(hf_config["model_type"], hf_config["model_type"])
    model_type, config_class, model_class = hf_model_code.FAMILIES[family]
    config = {key: value for key, value in hf_config.items() if key not in ("auto_map", "delta")}
    return {
        **config,
        "model_type": model_type,
        "architectures": [model_class],
        "auto_map": {"AutoConfig": f"configuration_delta.{config_class}",
                     "AutoModelForCausalLM": f"modeling_delta.{model_class}"},
        "delta": dataclasses.asdict(delta),
    }


def delta_from_hf_config(hf_config: dict) -> DeltaResidualConfig | None:
    """The routing an exported config.json records (None for a plain Qwen3 / Llama config)."""
    if hf_config.get("model_type") not in ROUTED_MODEL_TYPES:
        return None
    return _delta_from_dict(hf_config.get("delta") or {}, "config.json delta")


def transformer_config_from_hf(hf_config: dict, tensor_model_parallel_size: int = 1,
                               pipeline_model_parallel_size: int = 1,
                               virtual_pipeline_model_parallel_size: int | None = None,
                               make_vocab_size_divisible_by: int = 128):
    """Megatron TransformerConfig (fp32, CPU initialisation) of a Hugging Face config at a TP/PP
    layout: run_config.build_transformer_config of the model section model_config_from_hf gives."""
    return build_transformer_config(_run_config(
        model_config_from_hf(hf_config, make_vocab_size_divisible_by), DeltaResidualConfig(variant="standard"),
        tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
    ), on_gpu=False)


def _run_config(model: ModelConfig, delta: DeltaResidualConfig, tp: int, pp: int, vpp: int | None) -> RunConfig:
    return RunConfig(model=model, delta=delta, parallel=ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
    ))


def check_layout(model: ModelConfig, delta: DeltaResidualConfig, tp: int, pp: int, vpp: int | None) -> None:
    """Can a TP x PP (x VPP) mesh hold this model? Megatron's and the routing checks, one line each."""
    if model.vocab_size % tp:
        raise ConvertError(
            f"padded vocabulary {model.vocab_size} is not divisible by --tp {tp}; "
            f"use --make-vocab-size-divisible-by a multiple of {tp}"
        )
    for what, size in (("num_attention_heads", model.num_attention_heads),
                       ("num_key_value_heads", model.num_query_groups), ("intermediate_size", model.ffn_hidden_size)):
        if size % tp:
            raise ConvertError(
                f"config.json {what}={size} is not divisible by --tp {tp}; choose a --tp that divides it"
            )
    try:
        check_pipeline_split(model.num_layers, pp, vpp, layers="config.json num_hidden_layers", stages="--pp x --vpp")
        delta.validate_for(build_transformer_config(_run_config(model, delta, tp, pp, vpp), on_gpu=False))
    except DeltaConfigError as e:
        raise ConvertError(str(e)) from None
    except (AssertionError, ValueError) as e:
        raise ConvertError(f"Megatron's TransformerConfig rejects --tp {tp} --pp {pp} --vpp {vpp}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Weight layouts


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """The shapes the HF <-> Megatron weight mapping needs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the Hugging Face vocabulary
    padded_vocab_size: int  # rows of the Megatron embedding / output layer
    tied: bool
    qk_layernorm: bool

    @classmethod
    def of(cls, model: ModelConfig, hf_vocab_size: int, padded_vocab_size: int | None = None) -> "WeightLayout":
        return cls(
            num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups, head_dim=model.kv_channels, vocab_size=hf_vocab_size,
            padded_vocab_size=padded_vocab_size or model.vocab_size,
            tied=not model.untie_embeddings_and_output_weights, qk_layernorm=model.qk_layernorm,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """Megatron's linear_qkv weight: for each query group g, the rows of g's query heads, then
    k_g, then v_g (HF's repeat_kv gives query heads g*n..(g+1)*n-1 to key/value head g)."""
    groups, head_dim, hidden = layout.num_query_groups, layout.head_dim, layout.hidden_size
    q = q.reshape(groups, layout.heads_per_group * head_dim, hidden)
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, layout: WeightLayout) -> tuple:
    groups, head_dim, hidden = layout.num_query_groups, layout.head_dim, layout.hidden_size
    per_group = qkv.reshape(groups, (layout.heads_per_group + 2) * head_dim, hidden)
    q, k, v = per_group.split([layout.heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def hf_to_megatron(hf: dict, layout: WeightLayout) -> dict:
    """Megatron state-dict tensors (TP=1, PP=1 names) of the standard weights of an HF checkpoint.
    Every HF tensor must be used: anything left over is an error naming it."""
    hf = dict(hf)

    def take(name):
        if name not in hf:
            raise ConvertError(f"the Hugging Face checkpoint has no tensor {name!r} (config.json and weights disagree)")
        return hf.pop(name)

    embedding = take("model.embed_tokens.weight")
    if embedding.shape[0] != layout.vocab_size:
        raise ConvertError(
            f"model.embed_tokens.weight has {embedding.shape[0]} rows, config.json vocab_size={layout.vocab_size}"
        )
    out = {
        "embedding.word_embeddings.weight": _pad_rows(embedding, layout.padded_vocab_size),
        "decoder.final_layernorm.weight": take("model.norm.weight"),
    }
    if layout.tied:
        lm_head = hf.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
        if lm_head is not None and not torch.equal(lm_head, embedding):
            raise ConvertError(
                "config.json tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"
            )
    else:
        out["output_layer.weight"] = _pad_rows(take("lm_head.weight"), layout.padded_vocab_size)
    renames = {**LAYER_RENAMES, **(QK_NORM_RENAMES if layout.qk_layernorm else {})}
    for i in range(layout.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, megatron_name in renames.items():
            out[dst + megatron_name] = take(src + hf_name)
        out[dst + "self_attention.linear_qkv.weight"] = interleave_qkv(
            take(src + "self_attn.q_proj.weight"), take(src + "self_attn.k_proj.weight"),
            take(src + "self_attn.v_proj.weight"), layout,
        )
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]
        )
    leftover = sorted(name for name in hf if not name.endswith("rotary_emb.inv_freq"))
    if leftover:
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ConvertError(
            f"the Hugging Face checkpoint has tensors with no Megatron counterpart: {', '.join(leftover[:5])}{more} "
            f"(an architecture feature the converter does not support, or config.json does not match the weights)"
        )
    return out


def megatron_to_hf(state: dict, layout: WeightLayout) -> dict:
    """HF tensors of the standard weights of a Megatron TP=1, PP=1 state dict (inverse of hf_to_megatron)."""
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][: layout.vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    renames = {**LAYER_RENAMES, **(QK_NORM_RENAMES if layout.qk_layernorm else {})}
    for i in range(layout.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], layout)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v})
        for hf_name, megatron_name in renames.items():
            out[dst + hf_name] = state[src + megatron_name]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up})
    if not layout.tied:
        out["lm_head.weight"] = state["output_layer.weight"][: layout.vocab_size]
    return out


def routing_to_hf(state: dict) -> dict:
    """decoder.layers.{i}.{attention,mlp}_router.* / decoder.final_router.* -> model.<same>."""
    return {"model." + name.removeprefix("decoder."): tensor for name, tensor in state.items() if is_routing_parameter(name)}


def routing_from_hf(routing: dict) -> dict:
    return {"decoder." + name.removeprefix("model."): tensor for name, tensor in routing.items()}


# ---------------------------------------------------------------------------------------------
# Files


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, HF_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConvertError(
            f"--hf-dir {hf_dir}: no model.safetensors or {HF_INDEX}; only safetensors checkpoints are read "
            f"(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 20KB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def write_hf_weights(tensors: dict, hf_dir: str, max_shard_size: str = "5GB") -> list:
    """save_pretrained's layout: model.safetensors, or model-0000i-of-0000n.safetensors shards of at
    most max_shard_size plus model.safetensors.index.json. Returns the files written."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard},
    }
    with open(os.path.join(hf_dir, HF_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names + [HF_INDEX]


def _delta_from_dict(values: dict, where: str) -> DeltaResidualConfig:
    known = {f.name for f in dataclasses.fields(DeltaResidualConfig)}
    try:
        return DeltaResidualConfig(**{k: v for k, v in values.items() if k in known})
    except DeltaConfigError as e:
        raise ConvertError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The one-process model


@contextlib.contextmanager
def one_process_mesh():
    """A torch.distributed world of one (gloo) and a TP=1, PP=1 Megatron mesh, unless the caller
    already has them; whatever is started here is torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    started_group = not dist.is_initialized()
    if started_group:
        if not torch.cuda.is_available():
            from megatron_delta import cpu_shim

            cpu_shim.install()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    started_mesh = not parallel_state.model_parallel_is_initialized()
    try:
        one_process = dist.get_world_size() == 1 and (started_mesh or (
            parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
        ))
        if not one_process:
            raise ConvertError("conversion runs in one process (TP=1, PP=1); run it without torchrun")
        if started_mesh:
            parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        if started_mesh and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if started_group:
            dist.destroy_process_group()


def build_model(model: ModelConfig, delta: DeltaResidualConfig, config, seed: int = 1234,
                pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """The DeltaGPTModel (chunk) that `model` + `delta` describe, as megatron_delta.train builds it
    (without the DDP / Float16Module wrappers)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_model_chunk(RunConfig(model=model, delta=delta), config, model.vocab_size, vp_stage=vp_stage,
                             backend="local", pre_process=pre_process, post_process=post_process)


def _load_into(module: torch.nn.Module, tensors: dict) -> None:
    """Copy `tensors` into the module's parameters; the names must be exactly its parameters, less
    any routing parameters (which then keep their initial values)."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors) - {n for n in params if is_routing_parameter(n)})
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ConvertError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != params[name].shape:
                raise ConvertError(
                    f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


@contextlib.contextmanager
def _staged_output(path: str):
    """Yields an empty directory PATH.tmp that becomes `path` only if the block completes, so an
    interrupted conversion never leaves a checkpoint that looks complete."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"--output {path} exists and is not empty; choose a new directory")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.rmdir(path)  # empty (checked above)
    os.rename(tmp, path)


# ---------------------------------------------------------------------------------------------
# import / export


def import_hf(hf_dir: str, output: str, delta: DeltaResidualConfig | None = None, tensor_model_parallel_size: int = 1,
              pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: int | None = None,
              make_vocab_size_divisible_by: int = 128, seed: int = 1234) -> dict:
    """Hugging Face directory -> dist-checkpoint of a DeltaGPTModel at `output`. Returns the
    contents of output/conversion.json.

    `delta` defaults to the routing of an exported directory (config.json `delta`, whose
    parameters are then loaded too), else to delta_block with 4 blocks. Without saved routing the
    variant must have an identity init (standard, delta, delta_block with init="identity")."""
    hf_config = read_hf_config(hf_dir)
    saved_delta = delta_from_hf_config(hf_config)
    if saved_delta is not None:
        if delta is not None and delta != saved_delta:
            raise ConvertError(
                f"--hf-dir {hf_dir} holds routing parameters of {saved_delta}, not of the requested {delta}; "
                f"leave out --variant/--num-blocks to use the saved routing"
            )
        delta = saved_delta
    else:
        delta = delta or DeltaResidualConfig(variant="delta_block", num_blocks=4, init="identity")
        if delta.variant not in IMPORT_VARIANTS or (delta.routed and delta.init != "identity"):
            raise ConvertError(
                f"--variant {delta.variant} (init={delta.init!r}) cannot start from a pretrained model: only "
                f"{', '.join(IMPORT_VARIANTS)} with init='identity' compute the original model's logits"
            )
    model_cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by)
    check_layout(model_cfg, delta, tensor_model_parallel_size, pipeline_model_parallel_size,
                 virtual_pipeline_model_parallel_size)
    layout = WeightLayout.of(model_cfg, hf_config["vocab_size"])
    hf_weights = read_hf_weights(hf_dir)
    routing = routing_from_hf({name: hf_weights.pop(name) for name in list(hf_weights) if "_router." in name})
    state = {**hf_to_megatron(hf_weights, layout), **routing}

    from megatron.core import dist_checkpointing

    record = {
        "source": os.path.abspath(hf_dir),
        "model": dataclasses.asdict(model_cfg),
        "delta": dataclasses.asdict(delta),
        "hf_vocab_size": hf_config["vocab_size"],
        "checked_layout": {"tensor_model_parallel_size": tensor_model_parallel_size,
                           "pipeline_model_parallel_size": pipeline_model_parallel_size,
                           "virtual_pipeline_model_parallel_size": virtual_pipeline_model_parallel_size},
        "hf_config": hf_config,
    }
    with _staged_output(output) as tmp, one_process_mesh():
        model = build_model(model_cfg, delta, transformer_config_from_hf(
            hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by), seed=seed)
        _load_into(model, state)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, tmp)
        with open(os.path.join(tmp, CONVERSION_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return record


def resolve_checkpoint(path: str) -> str:
    """A dist-checkpoint directory, or a trainer checkpoint directory (its `latest` iteration)."""
    from megatron_delta.checkpointing import find_checkpoint

    found = find_checkpoint(path)
    if found is None:
        raise ConvertError(f"--checkpoint {path} is not a dist-checkpoint (no metadata.json) nor a directory with `latest`")
    return found


@dataclasses.dataclass
class CheckpointRecord:
    """What a checkpoint records about its model."""

    run: RunConfig | None  # a trainer checkpoint's run_config.yaml; an imported one's model + delta sections
    hf_config: dict | None = None  # imported: the source config.json
    source_dir: str | None = None  # imported: the Hugging Face directory it came from


def read_checkpoint_record(checkpoint: str) -> CheckpointRecord:
    """The conversion.json of an imported checkpoint, else the trainer's run_config.yaml beside it
    (an empty record if neither is there)."""
    conversion, run_config = os.path.join(checkpoint, CONVERSION_FILE), os.path.join(checkpoint, "run_config.yaml")
    if os.path.isfile(conversion):
        with open(conversion, encoding="utf-8") as f:
            record = json.load(f)
        try:
            model = ModelConfig(**record["model"])
        except TypeError as e:
            raise ConvertError(f"{conversion}: model section does not fit this version: {e}") from None
        run = RunConfig(model=model, delta=_delta_from_dict(record["delta"], conversion))
        return CheckpointRecord(run, record["hf_config"], record.get("source"))
    if os.path.isfile(run_config):
        from megatron_delta.run_config import load_run_config

        try:
            return CheckpointRecord(load_run_config(run_config))
        except (RunConfigError, ValueError) as e:
            raise ConvertError(f"{run_config}: {e}") from None
    return CheckpointRecord(None)


ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                       "kv_channels", "qk_layernorm", "untie_embeddings_and_output_weights", "rotary_base")


def _architecture(model: ModelConfig) -> dict:
    """The ARCHITECTURE_FIELDS of a model section, the trainer's None defaults resolved."""
    values = {field: getattr(model, field) for field in ARCHITECTURE_FIELDS}
    values["num_query_groups"] = values["num_query_groups"] or model.num_attention_heads
    values["ffn_hidden_size"] = values["ffn_hidden_size"] or 4 * model.hidden_size
    values["kv_channels"] = values["kv_channels"] or model.hidden_size // model.num_attention_heads
    return values


def _hf_config_of_checkpoint(checkpoint: str, record: CheckpointRecord, hf_dir: str | None):
    """(config.json, directory holding its tokenizer / generation files or None, whether the
    export writes the byte tokenizer's files) for an export: --hf-dir, else the import record, else
    derived from a from-scratch run's model and tokenizer."""
    if hf_dir:
        return read_hf_config(hf_dir), hf_dir, False
    if record.hf_config is not None:
        source = record.source_dir if record.source_dir and os.path.isdir(record.source_dir) else None
        return record.hf_config, source, False
    if record.run is None:
        raise ConvertError(
            f"--checkpoint {checkpoint} records no model (no conversion.json or run_config.yaml); "
            f"pass --hf-dir of the original model"
        )
    from megatron_delta.data import DataError, build_tokenizer

    data = record.run.data
    try:
        tokenizer = build_tokenizer(data)
    except DataError as e:
        raise ConvertError(f"--checkpoint {checkpoint}: its tokenizer cannot be loaded: {e}") from None
    tokenizer_dir = data.tokenizer_path if data.tokenizer == "huggingface" else None
    return (hf_config_from_model(record.run.model, tokenizer.vocab_size, tokenizer.eod), tokenizer_dir,
            data.tokenizer == "byte")


def _is_side_file(name: str) -> bool:
    """Tokenizer, generation and config files of an HF directory: not weights, not our model code."""
    return not (name.endswith(HF_WEIGHT_SUFFIXES) or name.endswith(".index.json")
                or name in hf_model_code.MODEL_CODE_FILES)


def export_hf(checkpoint: str, output: str, hf_dir: str | None = None, delta: DeltaResidualConfig | None = None,
              dtype: str | None = None, max_shard_size: str = "5GB") -> list:
    """Checkpoint -> Hugging Face directory at `output`. Returns the files written.

    The HF config comes from `hf_dir` (also the source of tokenizer and generation files), the
    conversion record of an imported checkpoint, or a from-scratch run's model section; the
    routing variant from the checkpoint (conversion.json or the trainer's run_config.yaml), else
    from `delta`."""
    from megatron_delta import checkpointing

    checkpoint = resolve_checkpoint(checkpoint)
    record = read_checkpoint_record(checkpoint)
    recorded_delta = record.run.delta if record.run else None
    if recorded_delta is not None and delta is not None and delta != recorded_delta:
        raise ConvertError(f"--checkpoint {checkpoint} is a {recorded_delta} model, not {delta}; leave out --variant")
    delta = recorded_delta or delta
    if delta is None:
        raise ConvertError(f"--checkpoint {checkpoint} records no routing variant; pass --variant and --num-blocks")
    hf_config, files_dir, byte_tokenizer = _hf_config_of_checkpoint(checkpoint, record, hf_dir)
    model_cfg = model_config_from_hf(hf_config)
    recorded, derived = _architecture(record.run.model) if record.run else {}, _architecture(model_cfg)
    for field, value in recorded.items():
        if value != derived[field]:
            raise ConvertError(
                f"--checkpoint {checkpoint} has model.{field}={value!r} but the Hugging Face config gives "
                f"{derived[field]!r}; pass the --hf-dir this checkpoint was converted from"
            )
    embedding = checkpointing.load_tensors_metadata(checkpoint)["embedding.word_embeddings.weight"]
    model_cfg = dataclasses.replace(model_cfg, vocab_size=embedding.global_shape[0])  # the padded vocabulary
    layout = WeightLayout.of(model_cfg, hf_config["vocab_size"])
    dtype_name = dtype or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype_name not in DTYPES:
        raise ConvertError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")

    def own_copy(tensor, to_dtype):  # safetensors refuses views that share storage
        return tensor.to(dtype=to_dtype, memory_format=torch.contiguous_format, copy=True)

    with _staged_output(output) as tmp:
        with one_process_mesh():
            model = build_model(model_cfg, delta, transformer_config_from_hf(hf_config))
            loaded = checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)
            model.load_state_dict(loaded["model"])
            state = {name: param.detach() for name, param in model.named_parameters()}
        hf_tensors = {name: own_copy(t, DTYPES[dtype_name]) for name, t in megatron_to_hf(state, layout).items()}
        # Routing parameters stay fp32 (the model keeps them in fp32 whatever its dtype).
        hf_tensors.update({name: own_copy(t, torch.float32) for name, t in routing_to_hf(state).items()})
        written = write_hf_weights(hf_tensors, tmp, max_shard_size)
        for name in sorted(os.listdir(files_dir)) if files_dir else ():
            if os.path.isfile(os.path.join(files_dir, name)) and _is_side_file(name):
                shutil.copy2(os.path.join(files_dir, name), tmp)
                written.append(name)
        if byte_tokenizer:
            from megatron_delta.data import write_hf_byte_tokenizer

            written += write_hf_byte_tokenizer(tmp)
        if delta.routed or "config.json" not in written:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(routed_hf_config(hf_config, delta) if delta.routed else hf_config, f, indent=2)
            written.append("config.json")
        if delta.routed:
            for name in hf_model_code.MODEL_CODE_FILES:
                shutil.copy2(os.path.join(hf_model_code.MODEL_CODE_DIR, name), tmp)
            written += hf_model_code.MODEL_CODE_FILES
    return sorted(set(written))


# ---------------------------------------------------------------------------------------------
# Command line


def _delta_from_args(args):
    if args.variant is None:
        return None
    try:
        # import starts the identity variants at identity; anything else keeps the paper's init
        # (and import then refuses it: it would not compute the original model).
        identity = args.command == "import" and args.variant in IMPORT_VARIANTS
        return DeltaResidualConfig(variant=args.variant, num_blocks=args.num_blocks,
                                   init=args.init or ("identity" if identity else "reference"))
    except DeltaConfigError as e:
        raise ConvertError(str(e)) from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="megatron-delta convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face directory -> Megatron dist-checkpoint")
    imp.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    imp.add_argument("--output", required=True, help="new directory for the dist-checkpoint")
    imp.add_argument("--variant", choices=IMPORT_VARIANTS + ("attnres_block", "attnres_full"),
                     help="routing variant (default: the HF directory's config.json delta, else delta_block)")
    imp.add_argument("--num-blocks", type=int, default=4, help="blocks of the block variants (default 4)")
    imp.add_argument("--init", choices=("identity", "reference"), help=argparse.SUPPRESS)
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    imp.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages to check the model against")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary with zero rows to a multiple of this (default 128; 1: no padding)")
    imp.add_argument("--seed", type=int, default=1234, help="seed of the routing queries' initialisation")
    exp = commands.add_parser("export", help="Megatron dist-checkpoint -> Hugging Face model directory")
    exp.add_argument("--checkpoint", required=True,
                     help="dist-checkpoint (import output or iter_XXXXXXX) or a trainer checkpoint dir with `latest`")
    exp.add_argument("--output", required=True, help="new directory for the Hugging Face model")
    exp.add_argument("--hf-dir", help="the original HF model (config, tokenizer); default: the import record")
    exp.add_argument("--variant", help="routing variant, if the checkpoint does not record it")
    exp.add_argument("--num-blocks", type=int, default=4)
    exp.add_argument("--init", choices=("identity", "reference"), help="with --variant: the routing init "
                     "(identity checkpoints have gates)")
    exp.add_argument("--dtype", choices=tuple(DTYPES), help="weights dtype (default: config.json's dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # many intra-op threads are slower on small CPU hosts
    from megatron_delta.checkpointing import CheckpointError

    try:
        if args.command == "import":
            record = import_hf(args.hf_dir, args.output, _delta_from_args(args), args.tp, args.pp, args.vpp,
                               args.make_vocab_size_divisible_by, args.seed)
            model = record["model"]
            print(f"wrote {args.output}: {record['delta']['variant']} model, {model['num_layers']} layers, "
                  f"vocabulary {record['hf_vocab_size']} padded to {model['vocab_size']}; loads on any TP/PP "
                  f"mesh (checked: tp {args.tp} pp {args.pp}{f' vpp {args.vpp}' if args.vpp else ''}).\n"
                  f"Fine-tune with checkpoint.load: {args.output}, checkpoint.finetune: true and this model "
                  f"section (also in {os.path.join(args.output, CONVERSION_FILE)}):")
            print(yaml.safe_dump({"model": model, "delta": record["delta"]}, sort_keys=False), end="")
        else:
            written = export_hf(args.checkpoint, args.output, args.hf_dir, _delta_from_args(args), args.dtype,
                                args.max_shard_size)
            print(f"wrote {args.output}: {', '.join(written)}")
    except (ConvertError, RunConfigError, OSError, CheckpointError) as e:
        print(f"megatron-delta convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # through the CLI, which checks the megatron-core release first
    from megatron_delta import cli

    sys.exit(cli.main(["convert", *sys.argv[1:]]))
