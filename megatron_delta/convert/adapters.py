"""Hugging Face <-> Megatron mapping of configs and weights: one state-dict adapter per model family
(torchtitan's StateDictAdapter idea). Pure functions of dicts and tensors: no files, no process
groups (megatron_delta.convert.hf_io reads and writes; megatron_delta.convert.command is the CLI).

    family (HF model_type)   adapter             what it adds to the shared Llama-style mapping
    llama                    LlamaAdapter        -
    qwen3                    Qwen3Adapter        q/k norms
    qwen3_moe                Qwen3MoeAdapter     q/k norms; routed experts on the MoE layers

Weight mapping (layer i; Megatron names are the local spec's at TP=1, PP=1, EP=1; TE checkpoints
and other meshes use the same dist-checkpoint keys):

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
  Qwen3-MoE layers (the hub's on-disk names; transformers 5 fuses the experts in memory and splits
  them again in save_pretrained):
    model.layers.i.mlp.gate.weight               decoder.layers.i.mlp.router.weight
    model.layers.i.mlp.experts.e.{gate,up}_proj.weight
                                                 decoder.layers.i.mlp.experts.local_experts.e.linear_fc1.weight
    model.layers.i.mlp.experts.e.down_proj.weight  decoder.layers.i.mlp.experts.local_experts.e.linear_fc2.weight

Qwen3-MoE routing is softmax over all experts, top-k, then (norm_topk_prob) renormalised over the
k chosen: exactly Megatron's TopKRouter with moe_router_pre_softmax=False (top-k of the logits,
softmax over those k). Without renormalisation it is moe_router_pre_softmax=True (softmax, then
top-k). A layer is MoE unless listed in mlp_only_layers and when (i + 1) % decoder_sparse_step == 0;
Megatron's moe_layer_freq gets that pattern as a per-layer list (1 when every layer is MoE).

Vocabulary padding: the embedding (and output layer) get zero rows up to a multiple of
make_vocab_size_divisible_by (default 128, so TP up to 128 can split it; 1 disables padding).
A padded class has logit exactly 0; Megatron's loss normalises over the padded vocabulary too, so
the converted model's loss equals the HF model's loss with those zero logits appended (a
difference of log(1 + P / sum_v exp(logit_v)) per token; none when the HF vocabulary is already
a multiple, as Qwen3's 151936 is of 128).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron_delta import hf as hf_model_code
from megatron_delta.config import DeltaConfigError, DeltaResidualConfig, check_pipeline_split
from megatron_delta.parameters import is_routing_parameter
from megatron_delta.run_config import ModelConfig, ParallelConfig, RunConfig, build_transformer_config


class ConvertError(ValueError):
    """A checkpoint or option the converter cannot handle; the message names it and the fix."""


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
    num_experts: int = 0  # 0: a dense model
    moe_layers: tuple = ()  # indices of the layers whose MLP is a mixture of experts

    @classmethod
    def of(cls, model: ModelConfig, hf_vocab_size: int, padded_vocab_size: int | None = None) -> "WeightLayout":
        return cls(
            num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups, head_dim=model.kv_channels, vocab_size=hf_vocab_size,
            padded_vocab_size=padded_vocab_size or model.vocab_size,
            tied=not model.untie_embeddings_and_output_weights, qk_layernorm=model.qk_layernorm,
            num_experts=model.num_moe_experts or 0,
            moe_layers=tuple(i for i, moe in enumerate(moe_layer_pattern(model)) if moe),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def moe_layer_pattern(model: ModelConfig) -> list:
    """1 for each MoE layer, 0 for each dense one (Megatron's reading of moe_layer_freq)."""
    if not model.num_moe_experts:
        return [0] * model.num_layers
    freq = model.moe_layer_freq
    return list(freq) if isinstance(freq, (list, tuple)) else [int(i % freq == 0) for i in range(model.num_layers)]


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


# ---------------------------------------------------------------------------------------------
# The adapters


class LlamaAdapter:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases): the mapping every family
    shares. Subclasses add their family's tensors and config fields."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"
    # Per-layer tensors that map one to one (HF name -> Megatron name, relative to the layer).
    layer_renames = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    }

    def __init__(self, layout: WeightLayout):
        self.layout = layout

    # -- config ---------------------------------------------------------------------------------

    @classmethod
    def model_fields(cls, hf_config: dict) -> dict:
        """The family's ModelConfig fields beyond the shared ones."""
        return {"qk_layernorm": False}

    @classmethod
    def hf_fields(cls, model: ModelConfig) -> dict:
        """The family's config.json fields beyond the shared ones (model_fields inverted)."""
        return {}

    # -- weights --------------------------------------------------------------------------------

    def from_hf(self, hf: dict) -> dict:
        """Megatron state-dict tensors (TP=1, PP=1 names) of the standard weights of an HF checkpoint.
        Every HF tensor must be used: anything left over is an error naming it."""
        layout, hf = self.layout, dict(hf)

        def take(name):
            if name not in hf:
                raise ConvertError(
                    f"the Hugging Face checkpoint has no tensor {name!r} (config.json and weights disagree)"
                )
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
        for i in range(layout.num_layers):
            src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
            for hf_name, megatron_name in self.layer_renames.items():
                out[dst + megatron_name] = take(src + hf_name)
            out[dst + "self_attention.linear_qkv.weight"] = interleave_qkv(
                take(src + "self_attn.q_proj.weight"), take(src + "self_attn.k_proj.weight"),
                take(src + "self_attn.v_proj.weight"), layout,
            )
            out.update(self.mlp_from_hf(take, i))
        leftover = sorted(name for name in hf if not name.endswith("rotary_emb.inv_freq"))
        if leftover:
            more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
            raise ConvertError(
                f"the Hugging Face checkpoint has tensors with no Megatron counterpart: {', '.join(leftover[:5])}"
                f"{more} (an architecture feature the converter does not support, or config.json does not match "
                f"the weights)"
            )
        return out

    def to_hf(self, state: dict) -> dict:
        """HF tensors of the standard weights of a Megatron TP=1, PP=1 state dict (inverse of from_hf)."""
        layout = self.layout
        out = {
            "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][: layout.vocab_size],
            "model.norm.weight": state["decoder.final_layernorm.weight"],
        }
        for i in range(layout.num_layers):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], layout)
            out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                        dst + "self_attn.v_proj.weight": v})
            for hf_name, megatron_name in self.layer_renames.items():
                out[dst + hf_name] = state[src + megatron_name]
            out.update(self.mlp_to_hf(state, i))
        if not layout.tied:
            out["lm_head.weight"] = state["output_layer.weight"][: layout.vocab_size]
        return out

    @staticmethod
    def _swiglu_from_hf(take, hf_prefix: str, megatron_prefix: str) -> dict:
        return {megatron_prefix + "linear_fc1.weight": torch.cat([take(hf_prefix + "gate_proj.weight"),
                                                                 take(hf_prefix + "up_proj.weight")]),
                megatron_prefix + "linear_fc2.weight": take(hf_prefix + "down_proj.weight")}

    @staticmethod
    def _swiglu_to_hf(state: dict, megatron_prefix: str, hf_prefix: str) -> dict:
        gate, up = state[megatron_prefix + "linear_fc1.weight"].chunk(2)
        return {hf_prefix + "gate_proj.weight": gate, hf_prefix + "up_proj.weight": up,
                hf_prefix + "down_proj.weight": state[megatron_prefix + "linear_fc2.weight"]}

    def mlp_from_hf(self, take, i: int) -> dict:
        """Layer i's MLP: linear_fc1 = cat[gate, up], linear_fc2 = down."""
        return self._swiglu_from_hf(take, f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp.")

    def mlp_to_hf(self, state: dict, i: int) -> dict:
        return self._swiglu_to_hf(state, f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp.")


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: Llama plus RMSNorm on each head's queries and keys."""

    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    layer_renames = {
        **LlamaAdapter.layer_renames,
        "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
        "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    }

    @classmethod
    def model_fields(cls, hf_config: dict) -> dict:
        return {"qk_layernorm": True}


class Qwen3MoeAdapter(Qwen3Adapter):
    """Qwen3-MoE: Qwen3 whose MoE layers hold a top-k router and routed SwiGLU experts (no shared
    expert); dense layers (mlp_only_layers) keep Qwen3's MLP of intermediate_size."""

    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    @classmethod
    def model_fields(cls, hf_config: dict) -> dict:
        experts = hf_config.get("num_experts", hf_config.get("num_local_experts"))
        if not experts:
            raise ConvertError(f"config.json num_experts={experts!r}: a Qwen3-MoE model needs experts; "
                               f"convert a dense model as model_type 'qwen3'")
        layers = hf_config["num_hidden_layers"]
        step, dense = hf_config.get("decoder_sparse_step", 1), set(hf_config.get("mlp_only_layers") or ())
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        return {
            "qk_layernorm": True, "num_moe_experts": experts, "moe_router_topk": hf_config["num_experts_per_tok"],
            "moe_ffn_hidden_size": hf_config["moe_intermediate_size"],
            "moe_layer_freq": 1 if all(pattern) else pattern,
            "moe_router_pre_softmax": not hf_config.get("norm_topk_prob", False),
            "moe_aux_loss_coeff": hf_config.get("router_aux_loss_coef", 0.0),
        }

    @classmethod
    def hf_fields(cls, model: ModelConfig) -> dict:
        unsupported = {
            "moe_shared_expert_intermediate_size": (model.moe_shared_expert_intermediate_size is not None,
                                                    "Qwen3-MoE has no shared expert"),
            "moe_router_score_function": (model.moe_router_score_function != "softmax",
                                          "Qwen3-MoE routes by softmax"),
            "moe_router_enable_expert_bias": (model.moe_router_enable_expert_bias,
                                              "Qwen3-MoE has no expert bias"),
            "qk_layernorm": (not model.qk_layernorm, "Qwen3-MoE has q/k norms"),
        }
        for field, (bad, why) in unsupported.items():
            if bad:
                raise ConvertError(f"model.{field}={getattr(model, field)!r}: {why}; the model has no Hugging Face "
                                   f"Qwen3-MoE counterpart")
        return {
            "num_experts": model.num_moe_experts, "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": model.moe_ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(moe_layer_pattern(model)) if not moe],
            "norm_topk_prob": not model.moe_router_pre_softmax,
            "router_aux_loss_coef": model.moe_aux_loss_coeff, "output_router_logits": False,
        }

    def mlp_from_hf(self, take, i: int) -> dict:
        if i not in self.layout.moe_layers:
            return super().mlp_from_hf(take, i)
        src, dst = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
        out = {dst + "router.weight": take(src + "gate.weight")}
        for e in range(self.layout.num_experts):
            out.update(self._swiglu_from_hf(take, f"{src}experts.{e}.", f"{dst}experts.local_experts.{e}."))
        return out

    def mlp_to_hf(self, state: dict, i: int) -> dict:
        if i not in self.layout.moe_layers:
            return super().mlp_to_hf(state, i)
        src, dst = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
        out = {dst + "gate.weight": state[src + "router.weight"]}
        for e in range(self.layout.num_experts):
            out.update(self._swiglu_to_hf(state, f"{src}experts.local_experts.{e}.", f"{dst}experts.{e}."))
        return out


ADAPTERS = {adapter.model_type: adapter for adapter in (LlamaAdapter, Qwen3Adapter, Qwen3MoeAdapter)}
# our exported model types -> the family they extend
ROUTED_MODEL_TYPES = {model_type: family for family, (model_type, _, _) in hf_model_code.FAMILIES.items()}


def family_of(model: ModelConfig) -> str:
    """The Hugging Face family of a model section: Qwen3-MoE with experts, Qwen3 with q/k norms, else Llama."""
    return _family(bool(model.num_moe_experts), model.qk_layernorm)


def _family(moe: bool, qk_layernorm: bool) -> str:
    return "qwen3_moe" if moe else "qwen3" if qk_layernorm else "llama"


def adapter_for(layout: WeightLayout) -> LlamaAdapter:
    return ADAPTERS[_family(bool(layout.num_experts), layout.qk_layernorm)](layout)


def hf_to_megatron(hf: dict, layout: WeightLayout) -> dict:
    """Megatron state-dict tensors of the standard (non-routing) weights of an HF checkpoint."""
    return adapter_for(layout).from_hf(hf)


def megatron_to_hf(state: dict, layout: WeightLayout) -> dict:
    """HF tensors of the standard weights of a Megatron TP=1, PP=1 state dict (inverse of hf_to_megatron)."""
    return adapter_for(layout).to_hf(state)


def routing_to_hf(state: dict) -> dict:
    """decoder.layers.{i}.{attention,mlp}_router.* / decoder.final_router.* -> model.<same>."""
    return {"model." + name.removeprefix("decoder."): tensor for name, tensor in state.items() if is_routing_parameter(name)}


def routing_from_hf(routing: dict) -> dict:
    return {"decoder." + name.removeprefix("model."): tensor for name, tensor in routing.items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face config -> the trainer's model section and Megatron's TransformerConfig


def _rope(hf_config: dict) -> tuple[float, str]:
    """(rope_theta, rope_type) from a transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) config."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = hf_config.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, rope_type


def model_config_from_hf(hf_config: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The `model:` section of a run config (megatron_delta.run_config.ModelConfig) that builds the
    Megatron equivalent of a Hugging Face Qwen3 / Llama / Qwen3-MoE config (config.json as a dict).

    vocab_size is the padded vocabulary the converted checkpoint holds; a fine-tuning run must
    use exactly this value (it does not depend on the TP size, unlike the trainer's default)."""
    model_type = hf_config.get("model_type")
    family = ROUTED_MODEL_TYPES.get(model_type, model_type)
    if family not in ADAPTERS:
        raise ConvertError(
            f"config.json model_type={model_type!r} is not supported; the converter handles "
            f"{', '.join(tuple(ADAPTERS) + tuple(ROUTED_MODEL_TYPES))}"
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
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
        init_method_std=hf_config.get("initializer_range", 0.02),
        hidden_dropout=0.0,
        attention_dropout=hf_config.get("attention_dropout", 0.0),
        transformer_impl="local",
        **ADAPTERS[family].model_fields(hf_config),
    )


def hf_config_from_model(model: ModelConfig, vocab_size: int, eos_token_id: int | None = None) -> dict:
    """config.json of a model trained from scratch: Qwen3-MoE with experts, Qwen3 with q/k norms,
    else Llama; the inverse of model_config_from_hf (checked by a round trip). `vocab_size`: the
    tokenizer's."""
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
    adapter = ADAPTERS[family_of(model)]
    return {
        "architectures": [adapter.architecture],
        "model_type": adapter.model_type,
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
        **adapter.hf_fields(model),
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


def delta_from_dict(values: dict, where: str) -> DeltaResidualConfig:
    known = {f.name for f in dataclasses.fields(DeltaResidualConfig)}
    try:
        return DeltaResidualConfig(**{k: v for k, v in values.items() if k in known})
    except DeltaConfigError as e:
        raise ConvertError(f"{where}: {e}") from None


def delta_from_hf_config(hf_config: dict) -> DeltaResidualConfig | None:
    """The routing an exported config.json records (None for a plain Qwen3 / Llama config)."""
    if hf_config.get("model_type") not in ROUTED_MODEL_TYPES:
        return None
    return delta_from_dict(hf_config.get("delta") or {}, "config.json delta")


ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                       "kv_channels", "qk_layernorm", "untie_embeddings_and_output_weights", "rotary_base",
                       "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax")


def architecture(model: ModelConfig) -> dict:
    """The ARCHITECTURE_FIELDS of a model section (plus its MoE layer pattern), the trainer's None
    defaults resolved: two sections with equal architectures hold the same weights."""
    values = {field: getattr(model, field) for field in ARCHITECTURE_FIELDS}
    values["num_query_groups"] = values["num_query_groups"] or model.num_attention_heads
    values["ffn_hidden_size"] = values["ffn_hidden_size"] or 4 * model.hidden_size
    values["kv_channels"] = values["kv_channels"] or model.hidden_size // model.num_attention_heads
    if model.num_moe_experts:
        values["moe_ffn_hidden_size"] = values["moe_ffn_hidden_size"] or values["ffn_hidden_size"]
        values["moe_layers"] = moe_layer_pattern(model)
    else:  # the MoE fields of a dense model mean nothing
        values.update(moe_router_topk=None, moe_ffn_hidden_size=None, moe_router_pre_softmax=None)
    return values


def _run_config(model: ModelConfig, delta: DeltaResidualConfig, tp: int, pp: int, vpp: int | None) -> RunConfig:
    return RunConfig(model=model, delta=delta, parallel=ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
    ))


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


def check_layout(model: ModelConfig, delta: DeltaResidualConfig, tp: int, pp: int, vpp: int | None) -> None:
    """Can a TP x PP (x VPP) mesh hold this model? Megatron's and the routing checks, one line each."""
    if model.vocab_size % tp:
        raise ConvertError(
            f"padded vocabulary {model.vocab_size} is not divisible by --tp {tp}; "
            f"use --make-vocab-size-divisible-by a multiple of {tp}"
        )
    sizes = [("num_attention_heads", model.num_attention_heads), ("num_key_value_heads", model.num_query_groups),
             ("intermediate_size", model.ffn_hidden_size)]
    if model.num_moe_experts:  # the experts split over TP too (expert_tensor_parallel_size defaults to TP)
        sizes.append(("moe_intermediate_size", model.moe_ffn_hidden_size))
    for what, size in sizes:
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
