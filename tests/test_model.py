"""Single-process tests of the routed model: math, identity, parameter count, dtypes, errors.

Parallel meshes are covered in tests/parallel/ (real processes over gloo)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_delta import (
    DeltaConfigError,
    DeltaGPTModel,
    DeltaResidualConfig,
    collect_routing_stats,
    get_gpt_delta_decoder_block_spec,
    get_gpt_delta_layer_spec,
)
from megatron_delta import kernels
from megatron_delta.layer import DeltaTransformerLayer
from megatron_delta.routing import DepthRoute, DepthRouter, route
from test_kernels import INTERPRETER_ON

VOCAB, SEQ, BATCH = 128, 16, 2
# The models are built on the CPU (use_cpu_initialization) and run where the tests run.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


pytestmark = pytest.mark.usefixtures("single_process_world")


def transformer_config(**overrides):
    kwargs = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build(delta, config=None, seed=0, cls=DeltaGPTModel):
    config = config or transformer_config()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_delta_layer_spec(delta, normalization="RMSNorm")
    kwargs = dict(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                  position_embedding_type="rope")
    model = cls(delta=delta, **kwargs) if cls is DeltaGPTModel else cls(**kwargs)
    return model if next(model.parameters()).is_meta else model.to(DEVICE)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    return tokens.to(DEVICE), position_ids.to(DEVICE)


# ---------------------------------------------------------------- routing math

def naive_route(sources, query, norm_weight, eps):
    """The method's definition, written the obvious way (stacked, normalised keys)."""
    stacked = torch.stack(sources).double()
    keys = stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    alpha = torch.softmax(keys @ query.double(), dim=0)
    return (alpha.unsqueeze(-1) * stacked).sum(0), alpha


def test_route_matches_definition_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    query = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    norm_weight = (1 + 0.1 * torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    routed, alpha = route(sources, query, norm_weight, 1e-6)
    expected, expected_alpha = naive_route(sources, query, norm_weight, 1e-6)
    torch.testing.assert_close(routed, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-12, atol=1e-12)
    weight = (query * norm_weight).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *s: DepthRoute.apply(w, 1e-6, *s)[0], (weight, *sources))


def test_route_softmax_is_fp32_for_bf16_sources():
    g = torch.Generator().manual_seed(0)
    sources32 = [torch.randn(5, 1, 64, generator=g) * (i + 1) for i in range(6)]
    query, norm_weight = torch.randn(64, generator=g) * 0.5, torch.ones(64)
    routed, alpha = route([s.bfloat16() for s in sources32], query.bfloat16(), norm_weight.bfloat16(), 1e-6)
    assert alpha.dtype == torch.float32 and routed.dtype == torch.bfloat16
    # Same bf16 inputs routed in fp64: only the final bf16 rounding of the output may differ.
    expected, expected_alpha = naive_route([s.bfloat16().double() for s in sources32],
                                           query.bfloat16(), norm_weight, 1e-6)
    torch.testing.assert_close(alpha.double(), expected_alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(routed.double(), expected, rtol=8e-3, atol=1e-2)


# ---------------------------------------------------------------- model structure

def test_routing_parameter_count_at_7b_shape():
    """hidden 4096 x 36 layers: 36 * 4 * 4096 = 589,824 extra parameters (built on meta)."""
    config = transformer_config(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                                ffn_hidden_size=12288, perform_initialization=False)

    def count(variant):
        with torch.device("meta"):
            model = build(DeltaResidualConfig(variant=variant, num_blocks=4), config)
        return sum(p.numel() for p in model.parameters())

    assert count("delta_block") - count("standard") == 589_824
    assert count("delta") - count("standard") == 589_824


def block_outputs_and_sources(variant):
    """Run a 4-layer, 2-block model and capture each sublayer's output and each layer's state."""
    model = build(DeltaResidualConfig(variant=variant, num_blocks=2))
    outputs, states = [], []
    for layer in model.decoder.layers:
        layer.self_attention.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
        layer.mlp.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
        layer.register_forward_hook(lambda m, a, state: states.append(state))
    tokens, position_ids = batch()
    model(tokens, position_ids, None)
    return outputs, states


@pytest.mark.parametrize("variant", ["delta", "delta_block", "attnres_block", "attnres_full"])
def test_every_sublayer_reads_the_routed_input_of_the_method(variant):
    """h_k, the input of sublayer k's pre-norm, against the method's equations evaluated (in
    float64, with the stacked naive route) on the captured embedding and sublayer outputs:
    additive h_k = x_{k-1} + route(S_k), replacement h_k = route(S_k), with S_k per variant."""
    delta = DeltaResidualConfig(variant=variant, num_blocks=2)
    model = build(delta, seed=7)
    with torch.no_grad():  # away from the init, so that a wrong query or source set shows
        for name, param in model.named_parameters():
            if "router" in name:
                param.copy_(torch.randn_like(param))
    inputs, outputs, embedding = [], [], []
    model.embedding.register_forward_hook(lambda m, a, out: embedding.append(out.detach()))
    for layer in model.decoder.layers:
        layer.input_layernorm.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach()))
        layer.pre_mlp_layernorm.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach()))
        layer.self_attention.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
        layer.mlp.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
    model(*batch(), None)

    x0, v = embedding[0].double(), [o.double() for o in outputs]
    routers = [r for layer in model.decoder.layers for r in (layer.attention_router, layer.mlp_router)]
    per_block = 2 * delta.layers_per_block(4)  # sublayers per block
    for k, router in enumerate(routers):
        if variant in ("delta", "attnres_full"):
            sources = [x0] + v[:k]
        else:
            first = k - k % per_block
            sources = [x0] + [sum(v[b:b + per_block]) for b in range(0, first, per_block)]
            if variant == "attnres_block" and k > first:
                sources.append(sum(v[first:k]))
        routed, _ = naive_route(sources, router.query.detach(), router.key_norm_weight.detach(), delta.norm_epsilon)
        expected = x0 + sum(v[:k]) + routed if delta.additive else routed
        torch.testing.assert_close(inputs[k].double(), expected, rtol=1e-5, atol=1e-5, msg=f"sublayer {k}")


def test_delta_block_sources_are_block_sums_of_sublayer_outputs():
    outputs, states = block_outputs_and_sources("delta_block")
    x0 = states[0].sources[0]
    # Block 0 = layers 1-2 = sublayer outputs 0..3; block 1 = outputs 4..7.
    d0, d1 = sum(outputs[0:4]), sum(outputs[4:8])
    after_block0, after_block1 = states[1].sources, states[3].sources
    assert len(after_block0) == 2 and len(after_block1) == 3
    assert after_block1[0] is x0
    torch.testing.assert_close(after_block0[1], d0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after_block1[2], d1, rtol=1e-6, atol=1e-6)
    # The reference code's defect would give x_0 + D_1 here.
    assert (after_block1[2] - d1).abs().max() < 1e-5 < (after_block1[2] - (x0 + d1)).abs().max()
    # Inside a block the sources are fixed: layer 1 (first of block 0) closes nothing.
    assert len(states[0].sources) == 1 and states[0].partial is not None
    # The residual stream is kept: x = x_0 + all sublayer outputs.
    torch.testing.assert_close(states[3].hidden, x0 + sum(outputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["delta", "attnres_full"])
def test_per_sublayer_sources_are_the_sublayer_outputs(variant):
    outputs, states = block_outputs_and_sources(variant)
    final = states[-1].sources
    assert len(final) == 1 + 8
    for source, output in zip(final[1:], outputs):
        torch.testing.assert_close(source, output, rtol=0, atol=0)
    assert (states[-1].hidden is None) == (variant == "attnres_full")


def test_attnres_block_routes_over_blocks_and_partial_and_replaces_stream():
    outputs, states = block_outputs_and_sources("attnres_block")
    assert states[-1].hidden is None
    torch.testing.assert_close(states[1].sources[1], sum(outputs[0:4]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[3].sources[2], sum(outputs[4:8]), rtol=1e-6, atol=1e-6)


def test_router_parameters_live_in_layers_and_final_router_only_for_replacement():
    for variant, has_final in [("delta_block", False), ("attnres_block", True), ("attnres_full", True)]:
        model = build(DeltaResidualConfig(variant=variant, num_blocks=2))
        names = [n for n, _ in model.named_parameters() if "router" in n]
        assert all(n.startswith("decoder.layers.") or n.startswith("decoder.final_router.") for n in names)
        assert any(n.startswith("decoder.final_router.") for n in names) == has_final
        assert all(isinstance(layer, DeltaTransformerLayer) for layer in model.decoder.layers)


def test_routers_come_from_the_layer_spec():
    """The spec carries the routers (built with build_module): swapping the spec's router swaps the model's."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    class HalfEpsRouter(DepthRouter):
        pass

    delta = DeltaResidualConfig(variant="delta", num_blocks=2)
    spec = get_gpt_delta_layer_spec(delta, normalization="RMSNorm")
    assert spec.submodules.attention_router == ModuleSpec(module=DepthRouter, params={"delta": delta})
    spec.submodules.mlp_router = ModuleSpec(module=HalfEpsRouter, params={"delta": delta})
    model = DeltaGPTModel(config=transformer_config(), delta=delta, transformer_layer_spec=spec, vocab_size=VOCAB,
                          max_sequence_length=SEQ, position_embedding_type="rope")
    assert [type(layer.mlp_router) for layer in model.decoder.layers] == [HalfEpsRouter] * 4
    assert [type(layer.attention_router) for layer in model.decoder.layers] == [DepthRouter] * 4
    assert model.decoder.layers[2].mlp_router.label == "layer_03.mlp"


@pytest.mark.parametrize("variant", ["delta", "attnres_full"])
def test_bias_dropout_fusion_is_the_specs_and_changes_nothing(variant, monkeypatch):
    """The routed layer runs the spec's bias-dropout-add: with bias_dropout_fusion Megatron's fused
    function is called (once per sublayer) and gives the unfused loss and gradients; the hidden
    dropout it applies is real. (Without dropout: the fused function is compiled, and compiled
    dropout draws its masks from another generator than eager dropout.)"""
    from megatron.core.fusions import fused_bias_dropout

    fused_calls, fused = [], fused_bias_dropout.bias_dropout_add_fused_train

    def counted(*args):
        fused_calls.append(1)
        return fused(*args)

    monkeypatch.setattr(fused_bias_dropout, "bias_dropout_add_fused_train", counted)
    results = {}
    for fusion, dropout in ((True, 0.0), (False, 0.0), (False, 0.2)):
        config = transformer_config(add_bias_linear=True, hidden_dropout=dropout, bias_dropout_fusion=fusion)
        results[fusion, dropout] = loss_and_grads(build(DeltaResidualConfig(variant=variant), config, seed=3).train())
    assert len(fused_calls) == 2 * 4  # the fused run only, every sublayer
    (fused_loss, fused_grads), (loss, grads) = results[True, 0.0], results[False, 0.0]
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert results[False, 0.2][0] != pytest.approx(loss, rel=1e-4)


def test_kernel_choice_is_fixed_when_the_model_is_built(monkeypatch):
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    model = build(DeltaResidualConfig(variant="delta_block", num_blocks=2))
    monkeypatch.setattr(kernels, "enabled", lambda: True)  # e.g. the environment changes later
    routers = [m for m in model.modules() if isinstance(m, DepthRouter)]
    assert len(routers) == 8 and not any(router.fused for router in routers)
    assert all(router.fused for router in build(DeltaResidualConfig(variant="delta")).modules()
               if isinstance(router, DepthRouter))


# ---------------------------------------------------------------- identity and standard

def assert_bit_identical(ours, plain):
    """Same parameter names and values, same loss, same gradients, bit for bit."""
    tokens, position_ids = batch()
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), plain.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    out_ours = ours(tokens, position_ids, None, labels=tokens)
    out_plain = plain(tokens, position_ids, None, labels=tokens)
    assert torch.equal(out_ours, out_plain)
    out_ours.sum().backward()
    out_plain.sum().backward()
    for (name, p1), p2 in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(p1.grad, p2.grad), name


def test_standard_variant_is_bit_identical_to_gpt_model():
    delta = DeltaResidualConfig(variant="standard")
    assert_bit_identical(build(delta), build(delta, cls=GPTModel))


# ---------------------------------------------------------------- mixture of experts

def moe_config(**overrides):
    """A dense first layer, then MoE layers (4 experts, top-2, a shared expert), aux loss on."""
    return transformer_config(**{
        **dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1, 1],
               moe_shared_expert_intermediate_size=32, moe_aux_loss_coeff=1e-2),
        **overrides,
    })


def build_moe(delta, config, seed=0, megatron_spec=False):
    """DeltaGPTModel on get_gpt_delta_decoder_block_spec, or (megatron_spec) Megatron's GPTModel
    on Megatron's own get_gpt_decoder_block_spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    kwargs = dict(config=config, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")
    if megatron_spec:
        return GPTModel(transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                        **kwargs).to(DEVICE)
    spec = get_gpt_delta_decoder_block_spec(delta, config)
    return DeltaGPTModel(delta=delta, transformer_layer_spec=spec, **kwargs).to(DEVICE)


def test_standard_moe_is_bit_identical_to_megatron_moe_gpt_model():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = moe_config()
    ours = build_moe(DeltaResidualConfig(variant="standard"), config)
    assert [type(layer.mlp) is MoELayer for layer in ours.decoder.layers] == [False, True, True, True]
    assert_bit_identical(ours, build_moe(None, config, megatron_spec=True))


@pytest.mark.parametrize("variant", ["delta", "delta_block", "attnres_block", "attnres_full"])
def test_routed_moe_model_routing_params_and_aux_loss(variant):
    """Routed MoE models keep 4 x hidden routing parameters per layer (+ the Kimi final router),
    and the router's load-balancing loss reaches the router weights through the routed layer:
    its gradient contribution is linear in moe_aux_loss_coeff, and it is recorded for the MoE
    layers only."""
    from megatron_delta import compat

    delta = DeltaResidualConfig(variant=variant, num_blocks=2)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    standard = build_moe(DeltaResidualConfig(variant="standard"), moe_config())
    tokens, position_ids = batch()
    router_grads = {}
    for coeff in (0.0, 1e-2, 2e-2):
        model = build_moe(delta, moe_config(moe_aux_loss_coeff=coeff))
        compat.clear_moe_aux_losses()
        model(tokens, position_ids, None, labels=tokens).mean().backward()
        router_grads[coeff] = model.decoder.layers[2].mlp.router.weight.grad.clone()
    hidden, layers = 64, 4
    final = 0 if delta.additive else 2 * hidden
    assert count(model) - count(standard) == 4 * hidden * layers + final
    aux = compat.moe_aux_losses(["load_balancing_loss"], layers)["load_balancing_loss"]
    assert aux[0] == 0 and (aux[1:] > 0).all()  # the dense first layer has no router
    step1, step2 = router_grads[1e-2] - router_grads[0.0], router_grads[2e-2] - router_grads[0.0]
    assert step1.abs().max() > 1e-4 * router_grads[0.0].abs().max()
    torch.testing.assert_close(step2, 2 * step1, rtol=1e-4, atol=1e-9)
    compat.clear_moe_aux_losses()


def test_expert_bias_load_balancing_updates_through_the_routed_layer():
    """Aux-loss-free balancing: the router counts tokens per expert in forward, and Megatron's
    finalize step moves the expert bias towards the under-loaded experts."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    config = moe_config(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                        moe_aux_loss_coeff=0.0, moe_router_bias_update_rate=1e-2)
    model = build_moe(DeltaResidualConfig(variant="delta_block", num_blocks=2), config)
    tokens, position_ids = batch()
    model(tokens, position_ids, None, labels=tokens).mean().backward()
    router = model.decoder.layers[1].mlp.router
    load = router.local_tokens_per_expert.clone()
    assert load.sum() == BATCH * SEQ * 2  # every token sent to top-2 experts
    _update_router_expert_bias([model], config)
    bias = router.expert_bias
    assert torch.equal(torch.sign(bias), torch.sign(load.mean() - load))  # sign(mean - load) x rate


@pytest.mark.parametrize("variant", ["delta_block", "attnres_full"])
def test_multi_token_prediction_on_a_routed_decoder(variant):
    """Megatron's MTP block on a routed decoder: its layers are plain TransformerLayers reading the
    decoder's final hidden state (Megatron's get_gpt_mtp_block_spec accepts only plain layer
    specs), its norms are the local backend's, and its loss trains them and reaches the routing."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_delta import get_gpt_delta_mtp_block_spec

    delta = DeltaResidualConfig(variant=variant, num_blocks=2)
    config = transformer_config(mtp_num_layers=1, mtp_loss_scaling_factor=0.5)
    plain_layer = get_gpt_delta_layer_spec(DeltaResidualConfig(variant="standard"), normalization="RMSNorm")

    def model(mtp_layer_spec):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        return DeltaGPTModel(config=config, delta=delta, transformer_layer_spec=get_gpt_delta_decoder_block_spec(
            delta, config, normalization="RMSNorm"), vocab_size=VOCAB, max_sequence_length=SEQ,
            position_embedding_type="rope",
            mtp_block_spec=get_gpt_delta_mtp_block_spec(config, mtp_layer_spec)).to(DEVICE)

    with_mtp = model(plain_layer)
    # (0.16 calls the MTP layer's transformer layer `transformer_layer`, 0.19 `mtp_model_layer`.)
    assert [type(m) for m in with_mtp.mtp.modules() if isinstance(m, TransformerLayer)] == [TransformerLayer]
    mtp_layer = with_mtp.mtp.layers[0]
    assert all(type(norm) is torch.nn.RMSNorm for norm in (mtp_layer.enorm, mtp_layer.hnorm, mtp_layer.final_layernorm))
    tokens, position_ids = batch()
    with_mtp(tokens, position_ids, None, labels=tokens).mean().backward()
    grads = {n: p.grad.abs().max().item() for n, p in with_mtp.named_parameters()}
    mtp_layer = [n for n in grads if n.startswith("mtp.layers.0.") and (".self_attention." in n or ".mlp." in n)]
    assert len(mtp_layer) == 4 and all(grads[n] > 0 for n in mtp_layer)
    assert grads["decoder.layers.3.mlp_router.query"] > 0


@pytest.mark.parametrize("variant", ["delta", "delta_block"])
def test_identity_init_equals_standard_model_and_routing_learns(variant):
    tokens, position_ids = batch()
    model = build(DeltaResidualConfig(variant=variant, num_blocks=2, init="identity"), seed=3)
    plain = build(DeltaResidualConfig(variant="standard"), cls=GPTModel)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("router" in k for k in unexpected)
    logits, plain_logits = model(tokens, position_ids, None), plain(tokens, position_ids, None)
    assert (logits - plain_logits).abs().max().item() < 1e-5
    assert (logits - plain_logits).abs().max().item() == 0.0  # gate 0: exactly x + 0

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router_grads = []
    for _ in range(2):
        optimizer.zero_grad()
        with collect_routing_stats(model) as stats:
            model(tokens, position_ids, None, labels=tokens).mean().backward()
        router_grads.append({n: p.grad.abs().max().item() for n, p in model.named_parameters() if "router" in n})
        optimizer.step()
    sources = {label: s["num_sources"] for label, s in stats.summary().items()}
    # Step 1: only the gates see a gradient (the routed term is multiplied by 0) ...
    assert all((v > 0) == n.endswith(".gate") for n, v in router_grads[0].items())
    # ... step 2: every routing parameter does, except query/key-norm of sublayers that route over
    # a single source (x_0 at the start of the model): their softmax is constant.
    for name, value in router_grads[1].items():
        layer, sublayer = name.split(".")[2], name.split(".")[3].removesuffix("_router")
        single_source = sources[f"layer_{int(layer) + 1:02d}.{sublayer}"] == 1
        assert (value > 0) == (name.endswith(".gate") or not single_source), name


def test_routing_stats_report_sharpness_per_sublayer():
    model = build(DeltaResidualConfig(variant="delta", num_blocks=2))
    tokens, position_ids = batch()
    with collect_routing_stats(model) as stats:
        model(tokens, position_ids, None)
    summary = stats.summary()
    assert len(summary) == 8
    last = summary["layer_04.mlp"]
    assert last["num_sources"] == 8 and abs(sum(last["mean_weight"]) - 1) < 1e-5
    assert 1 / 8 <= last["max_weight"] <= 1 and 0 <= last["entropy"] <= torch.log(torch.tensor(8.0)).item()
    assert summary["layer_01.attention"]["max_weight"] == 1.0


# ---------------------------------------------------------------- the fused kernels in the model

def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    tokens, position_ids = batch()
    loss = model(tokens, position_ids, None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not (kernels.HAVE_TRITON and INTERPRETER_ON),
                    reason="runs the kernels on this file's CPU models: needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant, expected_calls", [
    # delta_block: one block-level pass per block (2 layers x 2 sublayers), no residual (x moves
    # inside the block); delta: every sublayer with the residual add fused; attnres_block: every
    # sublayer plus the final routing, no residual (replacement).
    ("delta_block", [(4, False)] * 2),
    ("delta", [(1, True)] * 8),
    ("attnres_block", [(1, False)] * 9),
])
def test_fused_kernels_in_the_model_match_the_reference_path(variant, expected_calls, monkeypatch):
    """Every routing call of the model on the Triton kernels (in Triton's interpreter: the models
    of this file live on the CPU) gives the reference path's loss and gradients."""
    monkeypatch.setattr(kernels, "enabled", lambda: True)  # the routers are built to use the kernels
    model = build(DeltaResidualConfig(variant=variant, num_blocks=2), seed=5)
    ref_loss, ref_grads = loss_and_grads(model)  # CPU tensors: the kernels refuse them, reference path

    calls, fused_apply = [], kernels.FusedDepthRoute.apply

    def counted_apply(weights, eps, residual, *sources):
        calls.append((weights.shape[0], residual is not None))
        return fused_apply(weights, eps, residual, *sources)

    monkeypatch.setattr(kernels.FusedDepthRoute, "apply", counted_apply)
    monkeypatch.setattr(kernels, "supports", lambda tensors: all(
        t.dtype == torch.float32 and t.is_contiguous() and t.shape == tensors[0].shape for t in tensors))
    loss, grads = loss_and_grads(model)
    assert calls == expected_calls
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        assert (grads[name] - ref).abs().max().item() <= 1e-5 * scale + 1e-12, name


# ---------------------------------------------------------------- bad configs fail early

@pytest.mark.parametrize("kwargs, config_overrides, message", [
    (dict(variant="deltaa"), {}, "delta.variant='deltaa' is unknown"),
    (dict(variant="delta_block", num_blocks=0), {}, "delta.num_blocks=0 must be an integer >= 1"),
    (dict(variant="delta_block", num_blocks=5), {}, "delta.num_blocks=5 exceeds model.num_layers=4"),
    (dict(variant="delta_block", num_blocks=3), dict(num_layers=4),
     "gives blocks of 2 layers and only 2 blocks"),
    (dict(variant="attnres_block", init="identity"), {}, "delta.init='identity' needs an additive variant"),
    (dict(variant="delta", init="zero"), {}, "delta.init='zero' is unknown"),
    (dict(variant="delta"), dict(pipeline_model_parallel_size=3, pipeline_dtype=torch.float32),
     "model.num_layers=4 is not divisible by pipeline stages x virtual stages = 3 x 1"),
    (dict(variant="delta_block"), dict(context_parallel_size=2), "context_parallel_size=2: context parallelism"),
    (dict(variant="delta"), dict(num_moe_experts=2, add_bias_linear=True),
     "add_bias_linear=True with num_moe_experts"),
    (dict(variant="standard"), dict(num_moe_experts=2, moe_token_dispatcher_type="flex"),
     "moe_token_dispatcher_type='flex' needs DeepEP / HybridEP"),
    (dict(variant="delta"), dict(cuda_graph_impl="local"), "cuda_graph_impl is set"),
    (dict(variant="delta"), dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
     "recompute_modules=['layernorm'] is not supported"),
])
def test_bad_configs_fail_early_with_the_field_named(kwargs, config_overrides, message):
    with pytest.raises(DeltaConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        delta = DeltaResidualConfig(**kwargs)
        delta.validate_for(transformer_config(**config_overrides))


def test_transformer_engine_and_fp8_without_te_are_clear_errors():
    delta = DeltaResidualConfig(variant="delta_block", num_blocks=2)
    with pytest.raises(DeltaConfigError, match="needs NVIDIA Transformer Engine, which is not installed"):
        get_gpt_delta_layer_spec(delta, backend="transformer_engine")
    with pytest.raises(DeltaConfigError, match="backend='cuda' is unknown"):
        get_gpt_delta_layer_spec(delta, backend="cuda")
    config = transformer_config(fp8="hybrid")
    with pytest.raises(DeltaConfigError, match="fp8='hybrid' needs NVIDIA Transformer Engine"):
        build(delta, config)


def test_routed_variant_with_a_plain_layer_spec_is_rejected():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    with pytest.raises(DeltaConfigError, match="needs the layer spec from get_gpt_delta_layer_spec"):
        DeltaGPTModel(config=transformer_config(), delta=DeltaResidualConfig(variant="delta"),
                      transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
