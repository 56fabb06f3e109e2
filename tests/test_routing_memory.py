"""Routing over K sources keeps no stacked K x [tokens, h] copy for backward: measured, not assumed.

Two measurements, each against the obvious stacked implementation (the reference code's way):
  1. what autograd saves: bytes of saved tensors outside the sources' own storages, counted with
     torch.autograd.graph.saved_tensors_hooks;
  2. process memory: resident-set growth held between forward and backward, and the peak of a
     forward+backward (Linux VmHWM, reset through /proc/self/clear_refs), measured in a fresh
     process with glibc's mmap threshold pinned at 64 KiB so that every tensor of this size is its
     own mapping and RSS follows allocations exactly.
On CPU route() runs the reference DepthRoute; on a GPU machine the same tests would go through
route()'s dispatch, but the RSS test measures host memory and so stays on CPU.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_delta.routing import route

NUM_SOURCES, TOKENS, HIDDEN, EPS = 6, 2048, 512, 1e-6
SOURCE_BYTES = TOKENS * HIDDEN * 4  # one fp32 [tokens, h] tensor: 4 MiB
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_stacked_route(sources, query, norm_weight, eps):
    """The reference code's formulation: stack the sources, normalise the keys, einsum."""
    stacked = torch.stack(sources)
    keys = stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    alpha = torch.softmax(keys @ query, dim=0)
    return (alpha.unsqueeze(-1) * stacked).sum(0), alpha


def make_inputs(device="cpu", dtype=torch.float32, num_sources=NUM_SOURCES, tokens=TOKENS, hidden=HIDDEN):
    g = torch.Generator().manual_seed(0)
    sources = [(torch.randn(tokens, hidden, generator=g) * (i + 1)).to(device, dtype).requires_grad_()
               for i in range(num_sources)]
    query = (torch.randn(hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    norm_weight = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    return sources, query, norm_weight


def saved_bytes_outside_sources(fn, sources):
    """Run fn() and return (its output, bytes of the storages autograd saved for backward that are
    not the sources' own storages, each storage counted once)."""
    source_storages = {s.untyped_storage().data_ptr() for s in sources}
    extra = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in source_storages:
            extra[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    return output, sum(extra.values())


@pytest.mark.parametrize("device", DEVICES)
def test_route_saves_the_sources_and_per_token_scalars_only(device):
    sources, query, norm_weight = make_inputs(device)
    _, lean = saved_bytes_outside_sources(lambda: route(sources, query, norm_weight, EPS), sources)
    _, naive = saved_bytes_outside_sources(lambda: naive_stacked_route(sources, query, norm_weight, EPS), sources)
    stacked_copy = NUM_SOURCES * SOURCE_BYTES
    # DepthRoute: dot, inverse RMS and alpha ([K, tokens] each) + weight, query, key-norm weight
    # ([h] each) = 3 K T + 3 h fp32 values (the fused kernel saves 2 K T + T + 3 h).
    assert lean <= 4 * (3 * NUM_SOURCES * TOKENS + 3 * HIDDEN), lean
    assert lean < stacked_copy / 100, (lean, stacked_copy)
    assert naive >= stacked_copy, (naive, stacked_copy)


def test_route_process_memory_held_for_backward_and_peak():
    """Measured on CPU (6 sources of 4 MiB): routing holds its output and nothing else between
    forward and backward; the stacked version holds at least one more K x [tokens, h] copy
    (measured: 3.0 more), and its forward+backward peak is higher by at least that much."""
    lean, naive = measure_in_fresh_process("route"), measure_in_fresh_process("naive")
    stacked_copy = NUM_SOURCES * SOURCE_BYTES
    # Held: the [tokens, h] output (4 MiB) + a few [K, tokens] scalars, within 1 MiB of slack.
    assert lean["held"] <= SOURCE_BYTES + 2**20, lean
    assert naive["held"] >= lean["held"] + stacked_copy, (lean, naive)
    # Peak: the output and the K source gradients (7 x 4 MiB) are needed both ways; routing adds
    # at most 3 more [tokens, h] temporaries (measured: 2), the stacked version a lot more.
    assert (NUM_SOURCES + 1) * SOURCE_BYTES <= lean["peak"] <= (NUM_SOURCES + 4) * SOURCE_BYTES, lean
    assert naive["peak"] >= lean["peak"] + stacked_copy, (lean, naive)


def measure_in_fresh_process(implementation):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__, implementation], env=env, check=True,
                            capture_output=True, text=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_status(field):
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+) kB", status.read()).group(1)) * 1024


def _measure(implementation):
    torch.set_num_threads(1)
    fn = {"route": route, "naive": naive_stacked_route}[implementation]
    sources, query, norm_weight = make_inputs()
    grad_output = torch.randn(TOKENS, HIDDEN)
    # A first, unmeasured run: lazy imports and one-time allocations are not counted.
    fn(sources, query, norm_weight, EPS)[0].backward(grad_output)
    for tensor in (*sources, query, norm_weight):
        tensor.grad = None
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _memory_status("VmRSS")
    routed, _ = fn(sources, query, norm_weight, EPS)
    held = _memory_status("VmRSS") - before
    routed.backward(grad_output)
    peak = _memory_status("VmHWM") - before
    print(json.dumps({"held": held, "peak": peak}))


if __name__ == "__main__":
    _measure(sys.argv[1])
