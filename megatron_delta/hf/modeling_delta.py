"""Delta Attention Residuals in transformers: Qwen3 / Llama / Qwen3-MoE causal LMs whose sublayers read a routed input.

    model = AutoModelForCausalLM.from_pretrained(exported_dir, trust_remote_code=True)

Each sublayer (attention, then MLP) reads

    h = x + g * route(sources)     additive variants (delta, delta_block); g: a scalar gate under
                                   init="identity", else 1
    h = route(sources)             replacement variants (attnres_block, attnres_full)
    route(S) = sum_i softmax_i(q . RMSNorm_w(s_i)) s_i      (fp32, per token)
    v = f(Norm(h));  x = x + v

and v joins the sources: as its own source (delta, attnres_full) or summed into its block's
source, which sources gain when the block closes (delta_block, attnres_block; attnres_block also
routes over the open block's partial sum). The first source is the embedding. Replacement
variants route once more over all sources before the final norm.

init="identity": with every gate at 0, h = x and the model is exactly the plain Qwen3 / Llama
model made of the same weights; a fine-tuned model's gates are what it learned to add. Setting the
gates to 0 (`model.model.reset_routing_gates()`) gives the base model back.

Routing is per token (no term mixes positions), so the KV cache is transformers' own: each new
token routes over its own sources. Attention, MLP (Qwen3-MoE: its sparse MoE block), norms and
rotary embeddings are the family's modules; only the layer loop and the routers are ours. The
causal-LM forward (logits, loss, logits_to_keep) is the family's. Qwen3-MoE weights are stored as
the hub's Qwen3-MoE checkpoints are (one tensor per expert): this file registers transformers' own
Qwen3-MoE weight conversion (experts fused on load, split on save) for our model type. This file is copied into every exported directory and
imports only torch and transformers (written against transformers 5.24); the Megatron model that
it mirrors is megatron_delta (DeltaGPTModel), which the parity tests compare it with.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoePreTrainedModel,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
)

from .configuration_delta import DeltaLlamaConfig, DeltaQwen3Config, DeltaQwen3MoeConfig

# Our Qwen3-MoE directories hold the hub's per-expert tensors: load and save them as Qwen3-MoE's do.
register_checkpoint_conversion_mapping(DeltaQwen3MoeConfig.model_type,
                                       get_checkpoint_conversion_mapping("qwen3_moe"), overwrite=True)

ADDITIVE_VARIANTS = ("delta", "delta_block")
BLOCK_VARIANTS = ("delta_block", "attnres_block")


class DepthRouter(nn.Module):
    """One sublayer's routing parameters: query q, key-norm weight w, and under init="identity"
    the scalar gate on the routed term."""

    def __init__(self, hidden_size: int, eps: float, gated: bool):
        super().__init__()
        self.eps = eps
        self.query = nn.Parameter(torch.zeros(hidden_size))
        self.key_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, sources: list) -> torch.Tensor:
        stacked = torch.stack(sources).float()  # [K, batch, seq, hidden]
        keys = stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + self.eps) * self.key_norm_weight.float()
        weights = torch.softmax(keys @ self.query.float(), dim=0)  # over the K sources, per token
        routed = (weights.unsqueeze(-1) * stacked).sum(0).to(sources[0].dtype)
        return routed if self.gate is None else routed * self.gate


class DepthState:
    """The residual stream x (additive variants), the sources and the open block's partial sum."""

    def __init__(self, delta: dict, embedding: torch.Tensor):
        self.variant = delta["variant"]
        self.additive = self.variant in ADDITIVE_VARIANTS
        self.hidden = embedding if self.additive else None
        self.sources = [embedding]
        self.partial = None

    def run_sublayer(self, router: DepthRouter, sublayer) -> None:
        sources = self.sources
        if self.variant == "attnres_block" and self.partial is not None:
            sources = sources + [self.partial]
        routed = router(sources)
        v = sublayer(self.hidden + routed if self.additive else routed)
        if self.additive:
            self.hidden = self.hidden + v
        if self.variant in BLOCK_VARIANTS:
            self.partial = v if self.partial is None else self.partial + v
        else:
            self.sources.append(v)

    def close_block(self) -> None:
        self.sources.append(self.partial)
        self.partial = None


class _RoutedDecoderLayer:
    """Mixin over a Qwen3 / Llama decoder layer: the same attention, MLP and norms, with routed inputs."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        delta = config.delta
        gated = delta["init"] == "identity"
        self.attention_router = DepthRouter(config.hidden_size, delta["norm_epsilon"], gated)
        self.mlp_router = DepthRouter(config.hidden_size, delta["norm_epsilon"], gated)
        layers = config.num_hidden_layers
        per_block = math.ceil(layers / delta["num_blocks"]) if delta["variant"] in BLOCK_VARIANTS else None
        self.ends_block = per_block is not None and ((layer_idx + 1) % per_block == 0 or layer_idx + 1 == layers)

    def forward(self, state: DepthState, attention_mask=None, position_embeddings=None, position_ids=None,
                cache=None, use_cache=False, **kwargs) -> DepthState:
        def attention(h):
            return self.self_attn(hidden_states=self.input_layernorm(h), attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)[0]

        state.run_sublayer(self.attention_router, attention)
        state.run_sublayer(self.mlp_router, lambda h: self.mlp(self.post_attention_layernorm(h)))
        if self.ends_block:
            state.close_block()
        return state


class DeltaQwen3DecoderLayer(_RoutedDecoderLayer, Qwen3DecoderLayer):
    pass


class DeltaLlamaDecoderLayer(_RoutedDecoderLayer, LlamaDecoderLayer):
    pass


class DeltaQwen3MoeDecoderLayer(_RoutedDecoderLayer, Qwen3MoeDecoderLayer):
    pass


class _DeltaPreTrainedModel:
    """Mixin over a family's PreTrainedModel: router initialisation, routers kept in fp32."""

    supports_gradient_checkpointing = False
    _keep_in_fp32_modules = ["attention_router", "mlp_router", "final_router"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DepthRouter):  # the paper's init: q ~ N(0, std), w = 1, gate = 0
            init.normal_(module.query, mean=0.0, std=self.config.initializer_range)
            init.ones_(module.key_norm_weight)
            if module.gate is not None:
                init.zeros_(module.gate)


class _DeltaModel(_DeltaPreTrainedModel):
    """Embedding, routed layers, (final routing,) norm. Subclasses name the family's modules:
    decoder_layer_class, norm_class, rotary_class, and the family's output class."""

    _can_record_outputs = {}  # the layers pass a DepthState, not hidden states
    output_class = BaseModelOutputWithPast

    def __init__(self, config):
        super().__init__(config)
        delta = config.delta
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)]
        )
        self.final_router = (
            None if delta["variant"] in ADDITIVE_VARIANTS
            else DepthRouter(config.hidden_size, delta["norm_epsilon"], gated=False)
        )
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.rotary_class(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @torch.no_grad()
    def reset_routing_gates(self) -> None:
        """Close every gate (init="identity" models): the model becomes the plain base model."""
        for module in self.modules():
            if isinstance(module, DepthRouter) and module.gate is not None:
                module.gate.zero_()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_router_logits=False, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_router_logits:
            raise ValueError("output_router_logits=True: the routed model does not record the MoE router logits "
                             "(no load-balancing loss); leave it False")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        state = DepthState(self.config.delta, inputs_embeds)
        for layer in self.layers:
            state = layer(state, attention_mask=mask, position_embeddings=position_embeddings,
                          position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        final = state.hidden if self.final_router is None else self.final_router(state.sources)
        return self.output_class(last_hidden_state=self.norm(final), cache=cache if use_cache else None)


class DeltaQwen3Model(_DeltaModel, Qwen3PreTrainedModel):
    config: DeltaQwen3Config
    config_class = DeltaQwen3Config
    _no_split_modules = ["DeltaQwen3DecoderLayer"]
    decoder_layer_class, norm_class, rotary_class = DeltaQwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding


class DeltaLlamaModel(_DeltaModel, LlamaPreTrainedModel):
    config: DeltaLlamaConfig
    config_class = DeltaLlamaConfig
    _no_split_modules = ["DeltaLlamaDecoderLayer"]
    decoder_layer_class, norm_class, rotary_class = DeltaLlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class DeltaQwen3MoeModel(_DeltaModel, Qwen3MoePreTrainedModel):
    config: DeltaQwen3MoeConfig
    config_class = DeltaQwen3MoeConfig
    _no_split_modules = ["DeltaQwen3MoeDecoderLayer"]
    decoder_layer_class, norm_class, rotary_class = DeltaQwen3MoeDecoderLayer, Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding
    output_class = MoeModelOutputWithPast  # Qwen3-MoE's causal-LM forward reads its router_logits (None)


class _DeltaForCausalLM(_DeltaPreTrainedModel):
    """The family's causal-LM head over our routed model: forward and tied weights are those of
    the family's own causal LM (`hf_causal_lm`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("hf_causal_lm")
        if family is not None:
            cls._tied_weights_keys, cls.forward = family._tied_weights_keys, family.forward

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class DeltaQwen3ForCausalLM(_DeltaForCausalLM, Qwen3PreTrainedModel, GenerationMixin):
    config: DeltaQwen3Config
    config_class = DeltaQwen3Config
    base_model_class = DeltaQwen3Model
    hf_causal_lm = Qwen3ForCausalLM


class DeltaLlamaForCausalLM(_DeltaForCausalLM, LlamaPreTrainedModel, GenerationMixin):
    config: DeltaLlamaConfig
    config_class = DeltaLlamaConfig
    base_model_class = DeltaLlamaModel
    hf_causal_lm = LlamaForCausalLM


class DeltaQwen3MoeForCausalLM(_DeltaForCausalLM, Qwen3MoePreTrainedModel, GenerationMixin):
    config: DeltaQwen3MoeConfig
    config_class = DeltaQwen3MoeConfig
    base_model_class = DeltaQwen3MoeModel
    hf_causal_lm = Qwen3MoeForCausalLM

    def __init__(self, config):
        super().__init__(config)
        # what Qwen3-MoE's forward reads for its load-balancing loss
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
