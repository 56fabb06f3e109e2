"""The fused Triton routing kernels (megatron_delta/kernels.py) against float64 references.

Without a GPU the kernels run under Triton's interpreter, which Triton only enables if
TRITON_INTERPRET=1 is set before triton is first imported (megatron.core imports it): this file
sets it when it is imported first; in a full test run, set it in the environment or in
tests/conftest.py. On a GPU the same tests run the compiled kernels on CUDA tensors.
test_kernels_compile_for_hopper additionally compiles them for sm_90 (no GPU needed).
"""

import os
import re
import subprocess
import sys
import tempfile

import torch

# Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then).
INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0" if "triton" in sys.modules else "1") == "1"
if not torch.cuda.is_available() and INTERPRETER_ON:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from megatron_delta import kernels
from megatron_delta.routing import DepthRoute, route, route_block
from test_routing_memory import make_inputs, saved_bytes_outside_sources

EPS = 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_unavailable():
    if not kernels.HAVE_TRITON:
        return "triton is not installed (pip install triton; it is in the `test` extra)"
    if DEVICE == "cpu" and not INTERPRETER_ON:
        return ("no GPU, and triton was imported before TRITON_INTERPRET=1 was set (megatron.core "
                "imports it), so its interpreter is off: run with TRITON_INTERPRET=1 in the environment")
    return None


needs_kernels = pytest.mark.skipif(_kernels_unavailable() is not None, reason=str(_kernels_unavailable()))


def reference(sources, weights, eps, residual=None):
    """The method's definition (called on float64 inputs): stacked sources, RMS-normalised keys, softmax over depth."""
    stacked = torch.stack(sources)
    keys = stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + eps)
    alpha = torch.softmax(torch.einsum("k...h,mh->mk...", keys, weights), dim=1)
    routed = torch.einsum("mk...,k...h->m...h", alpha, stacked)
    return (routed if residual is None else routed + residual), alpha


def random_case(num_sources, num_queries, hidden=48, shape=(5, 2), dtype=torch.float32, seed=0):
    """Sources of different scales (so that the softmax is far from uniform) and weights that give
    logits of order 1; hidden is not a power of two, so the masked tail of each row is exercised."""
    g = torch.Generator().manual_seed(seed)
    sources = [(torch.randn(*shape, hidden, generator=g) * (1 + i)).to(DEVICE, dtype).requires_grad_()
               for i in range(num_sources)]
    weights = torch.randn(num_queries, hidden, generator=g).to(DEVICE).requires_grad_()
    return sources, weights


def gradients(output, inputs, grad_output):
    return torch.autograd.grad(output, inputs, grad_output)


def float64_leaves(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_matches_reference(num_sources, num_queries, with_residual=False, **case):
    sources, weights = random_case(num_sources, num_queries, **case)
    residual = torch.randn_like(sources[0]).requires_grad_() if with_residual else None
    inputs = [weights, *sources] + ([residual] if with_residual else [])
    inputs64 = float64_leaves(inputs)
    routed, alpha = kernels.FusedDepthRoute.apply(weights, EPS, residual, *sources)
    expected, expected_alpha = reference(inputs64[1:num_sources + 1], inputs64[0], EPS,
                                         inputs64[-1] if with_residual else None)
    assert routed.shape == (num_queries, *sources[0].shape) and alpha.shape == (num_queries, num_sources, 5, 2)
    assert_close_at_fp32(routed, expected)
    assert_close_at_fp32(alpha, expected_alpha)
    grad_output = torch.randn_like(routed)
    for got, want in zip(gradients(routed, inputs, grad_output), gradients(expected, inputs64, grad_output.double())):
        assert_close_at_fp32(got, want)


def assert_close_at_fp32(got, want):
    """Within 1e-5 of the tensor's largest magnitude (measured: at most 2e-6 of it; DepthRoute in
    fp32 is at most 1e-6 of it on the same cases)."""
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("num_sources", [1, 2, 5])
def test_fused_route_matches_float64_definition(num_sources):
    assert_matches_reference(num_sources, num_queries=1)


@needs_kernels
def test_fused_route_with_residual_add():
    assert_matches_reference(num_sources=3, num_queries=1, with_residual=True)


@needs_kernels
@pytest.mark.parametrize("num_queries", [2, 3])
def test_route_block_matches_float64_definition(num_queries):
    assert_matches_reference(num_sources=4, num_queries=num_queries)


@needs_kernels
def test_weight_gradient_summed_over_uneven_token_chunks(monkeypatch):
    """The weight gradient is reduced over per-chunk partial sums; force 3 rows per chunk so that
    chunks hold several tokens and the last one is partial (10 tokens)."""
    monkeypatch.setattr(kernels, "_PARTIAL_GRAD_ELEMENTS", 2 * 48 * 4)
    assert_matches_reference(num_sources=3, num_queries=2)


@needs_kernels
def test_fused_route_in_bf16_matches_depth_route():
    """Same bf16 inputs, both accumulating in fp32: alpha agrees to fp32 rounding, the bf16
    outputs and source gradients to one bf16 rounding (2**-8 relative)."""
    sources, weights = random_case(4, 1, hidden=64, dtype=torch.bfloat16, seed=1)
    weight = weights[0].detach().requires_grad_()
    routed, alpha = kernels.fused_route(sources, weight, EPS)
    expected, expected_alpha = DepthRoute.apply(weight, EPS, *sources)
    assert routed.dtype == torch.bfloat16 and alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, expected_alpha, rtol=0, atol=1e-5)
    torch.testing.assert_close(routed.float(), expected.float(), rtol=2**-7, atol=1e-2)
    grad_output = torch.randn_like(routed)
    grad_weight, *grad_sources = gradients(routed, [weight, *sources], grad_output)
    expected_grad_weight, *expected_grad_sources = gradients(expected, [weight, *sources], grad_output)
    torch.testing.assert_close(grad_weight, expected_grad_weight, rtol=0,
                               atol=1e-5 * expected_grad_weight.abs().max().item())
    for got, want in zip(grad_sources, expected_grad_sources):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2 * want.abs().max().item())


@needs_kernels
def test_fused_route_saves_only_per_token_scalars():
    num_sources, tokens, hidden = 4, 32, 256
    sources, query, norm_weight = make_inputs(DEVICE, num_sources=num_sources, tokens=tokens, hidden=hidden)
    (routed, _), saved = saved_bytes_outside_sources(
        lambda: kernels.fused_route(sources, query * norm_weight, EPS), sources)
    # logits + inverse RMS [K, T], log-sum-exp [T], and weight, query, key-norm weight [h], fp32.
    assert saved == 4 * ((2 * num_sources + 1) * tokens + 3 * hidden), saved
    routed.sum().backward()  # the saved scalars are enough for backward


def test_route_block_reference_path_on_cpu_equals_per_sublayer_routes():
    sources, weights = random_case(3, 2, dtype=torch.float64)
    sources = [s.detach().cpu().requires_grad_() for s in sources]
    weights = weights.detach().cpu().double()
    assert not kernels.supports(sources)
    routed, alpha = route_block(sources, weights, EPS, fused=True)
    for m in range(2):
        expected, expected_alpha = DepthRoute.apply(weights[m], EPS, *sources)
        assert torch.equal(routed[m], expected) and torch.equal(alpha[m], expected_alpha)


def test_route_with_residual_adds_it_on_every_path():
    """route(..., residual=x) is x + route(...) (here the reference path; the fused path is
    checked above against the float64 definition)."""
    sources, query, norm_weight = make_inputs(DEVICE, num_sources=3, tokens=8, hidden=32)
    residual = torch.randn_like(sources[0])
    routed, alpha = route(sources, query, norm_weight, EPS)
    with_residual, alpha_again = route(sources, query, norm_weight, EPS, residual=residual)
    torch.testing.assert_close(with_residual, residual + routed, rtol=1e-6, atol=1e-6)
    assert torch.equal(alpha, alpha_again)


def test_kernels_are_chosen_only_for_cuda_tensors_and_can_be_disabled(monkeypatch):
    cpu = [torch.zeros(2, 8), torch.zeros(2, 8)]
    assert not kernels.supports(cpu)
    if torch.cuda.is_available() and kernels.HAVE_TRITON:
        gpu = [t.cuda() for t in cpu]
        assert kernels.supports(gpu)
        assert not kernels.supports([gpu[0], gpu[1].double()])
        assert not kernels.supports([gpu[0], torch.zeros(8, 2, device="cuda").t()])  # not contiguous
        assert kernels.enabled()
        monkeypatch.setenv(kernels.DISABLE_ENV, "0")
        assert not kernels.enabled()


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_hopper():
    """Compile the three kernels for sm_90 with Triton's bundled ptxas, in a process without the
    interpreter: catches type errors that the interpreter lets through, and register spills (h up
    to 4096, up to 32 block queries). No GPU needed."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("no spills") == 6, result.stdout


def _compile_for_hopper():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def compile_kernel(kernel, signature, constexprs, block_elements):
        """Compile as launched (num_warps as FusedDepthRoute picks it for this block size) and
        check that no registers spill to local memory."""
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        num_warps = kernels._num_warps(block_elements)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        resources = re.search(r"REG:(\d+) .*LOCAL:(\d+)", usage)
        assert resources and resources.group(2) == "0", (kernel.__name__, constexprs, usage)
        print(kernel.__name__, constexprs, f"{num_warps} warps, {resources.group(1)} registers, no spills: cubin")

    scalars = dict(num_tokens="i32", hidden="i32", num_sources="i32", num_queries="i32")
    saved = dict(logits="*fp32", lse="*fp32", inv_rms="*fp32")
    sources = dict(source_addresses="*i64", first_source="*bf16")
    forward = dict(**sources, weights="*fp32", out="*bf16", **saved, **scalars, eps="fp32")
    compile_kernel(kernels._route_forward_kernel, forward, dict(residual=None, BLOCK_H=4096), 4096)
    compile_kernel(kernels._route_forward_kernel, dict(forward, residual="*bf16"), dict(BLOCK_H=2048), 2048)
    compile_kernel(kernels._route_backward_scalars_kernel, dict(**sources, grad_out="*bf16", **saved,
                   scale="*fp32", **scalars), dict(BLOCK_H=4096, BLOCK_K=8), 4096)
    tiles = dict(**sources, grad_source_addresses="*i64", weights="*fp32", grad_out="*bf16", **saved,
                 scale="*fp32", partial_grad_weights="*fp32", **scalars, rows_per_chunk="i32")
    for block_m, tile_h in [(1, 2048), (8, 256), (32, 64)]:
        compile_kernel(kernels._route_backward_tiles_kernel, tiles, dict(BLOCK_M=block_m, TILE_H=tile_h),
                       block_m * tile_h)


if __name__ == "__main__":
    _compile_for_hopper()
