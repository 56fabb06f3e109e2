"""Speed of the depth-routing op: achieved bandwidth and speed-up over the naive stacked version.

    python benchmarks/bench_routing.py                     # CPU default: ~10 s of CPU time
    python benchmarks/bench_routing.py --tokens 16384 --hidden 4096 --dtype bf16 --sources 2 5 9 37 73
                                                           # GPU (1B-8B shapes, delta up to 36 layers)

Implementations, timed in the same run on the same inputs:
    naive      the reference code's formulation: stack the K sources, RMS-normalise the keys,
               einsum the logits, softmax, einsum the weighted sum (keeps K x [T, h] copies)
    reference  routing.DepthRoute (what route() runs on CPU): per-source passes, no stacked copy
    fused      kernels.fused_route, the Triton kernel (GPU only; absent on CPU)
and, with --block-queries M > 1, the M routed inputs of one delta_block block (same sources):
    naive xM / reference xM   M separate routes;  fused block   kernels.route_block, one pass

Byte model (what the op must move, e = bytes per element, T tokens, h hidden):
    forward            read K sources + write 1 output          (K + 1) T h e
    forward+backward   + read the output gradient, read K sources, write K gradients
                                                                 (3K + 2) T h e
    block forward      read K sources + write M outputs          (K + M) T h e
Achieved GB/s = those bytes / time; "of copy" compares with a plain tensor copy measured in the
same run (read + write, the practical bandwidth roof of the device). Timings are the best of
--repeats runs after one warm-up: GPU wall time; on CPU the process's CPU time (one thread),
which other load on a shared host does not inflate the way it inflates wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import time

import torch

from megatron_delta import kernels
from megatron_delta.routing import DepthRoute

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo.read())
    return f"CPU {model.group(1) if model else ''} ({os.cpu_count()} cores), {torch.get_num_threads()} thread(s)"


def naive_stacked_route(sources, weight, eps):
    """The unfused reference formulation (weight = query * key-norm weight)."""
    stacked = torch.stack(sources).float()  # [K, T, h]
    keys = stacked * torch.rsqrt(stacked.pow(2).mean(-1, keepdim=True) + eps)
    alpha = torch.einsum("kth,h->kt", keys, weight).softmax(0)
    return torch.einsum("kt,kth->th", alpha, stacked).to(sources[0].dtype)


def reference_route(sources, weight, eps):
    return DepthRoute.apply(weight, eps, *sources)[0]


def fused_route(sources, weight, eps):
    return kernels.fused_route(sources, weight, eps)[0]


def fused_route_block(sources, weights, eps):
    return kernels.route_block(sources, weights, eps)[0]


def best_time(repeats, device, fn, *args):
    """Best time of fn(*args) over `repeats` runs, after one warm-up run: wall time on GPU, this
    process's CPU time on CPU (one thread; not inflated by other processes on a shared host)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    once()
    return min(once() for _ in range(repeats))


def copy_bandwidth(tokens, hidden, dtype, device, repeats):
    """GB/s of a plain device copy of a [4T, h] tensor (read + write)."""
    source = torch.randn(4 * tokens, hidden, device=device).to(dtype)
    target = torch.empty_like(source)
    seconds = best_time(repeats, device, target.copy_, source)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def make_inputs(num_sources, num_queries, tokens, hidden, dtype, device):
    g = torch.Generator().manual_seed(0)
    sources = [(torch.randn(tokens, hidden, generator=g) * (1 + i % 3)).to(device, dtype).requires_grad_()
               for i in range(num_sources)]
    weights = (torch.randn(num_queries, hidden, generator=g) / hidden**0.5).to(device).requires_grad_()
    return sources, weights


def forward_backward(fn, sources, weight, eps, grad_output):
    return torch.autograd.grad(fn(sources, weight, eps), [weight, *sources], grad_output)


def each_query(fn, sources, weights, eps):
    return [fn(sources, w, eps) for w in weights]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--tokens", type=int, default=1024, help="T = sequence x micro-batch")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--sources", type=int, nargs="+", default=[2, 5, 9], help="K values")
    parser.add_argument("--block-queries", type=int, default=4, help="M for the block-level pass (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    eps = 1e-6
    unit = args.tokens * args.hidden * dtype.itemsize  # bytes of one [T, h] tensor

    print(f"bench_routing | {datetime.date.today()} | {device_description(device)} | torch {torch.__version__} | "
          f"T={args.tokens} h={args.hidden} "
          f"{dtype} | best of {args.repeats}")
    copy = copy_bandwidth(args.tokens, args.hidden, dtype, device, args.repeats)
    print(f"copy bandwidth (read + write): {copy:.1f} GB/s")

    probe, _ = make_inputs(1, 1, 1, args.hidden, dtype, device)
    single = {"naive": naive_stacked_route, "reference": reference_route}
    if kernels.supports(probe):
        single["fused"] = fused_route
    else:
        print("fused: not available here (needs CUDA tensors and triton) -> reference path only")

    header = f"{'K':>3} {'impl':>10} | {'fwd ms':>8} {'GB/s':>7} {'of copy':>7} {'x naive':>7} | " \
             f"{'fwd+bwd ms':>10} {'GB/s':>7} {'of copy':>7} {'x naive':>7}"
    print(header)
    for num_sources in args.sources:
        sources, weights = make_inputs(num_sources, 1, args.tokens, args.hidden, dtype, device)
        weight = weights[0].detach().requires_grad_()
        grad_output = torch.randn_like(sources[0])
        rows = {}
        for name, fn in single.items():
            with torch.no_grad():
                fwd = best_time(args.repeats, device, fn, sources, weight, eps)
            fwd_bwd = best_time(args.repeats, device, forward_backward, fn, sources, weight, eps, grad_output)
            rows[name] = (fwd, fwd_bwd)
        for name, (fwd, fwd_bwd) in rows.items():
            fwd_gbs = (num_sources + 1) * unit / fwd / 1e9
            fwd_bwd_gbs = (3 * num_sources + 2) * unit / fwd_bwd / 1e9
            print(f"{num_sources:>3} {name:>10} | {fwd * 1e3:>8.2f} {fwd_gbs:>7.1f} {fwd_gbs / copy:>7.0%} "
                  f"{rows['naive'][0] / fwd:>7.2f} | {fwd_bwd * 1e3:>10.2f} {fwd_bwd_gbs:>7.1f} "
                  f"{fwd_bwd_gbs / copy:>7.0%} {rows['naive'][1] / fwd_bwd:>7.2f}")
        del sources, grad_output

    num_queries = args.block_queries
    if num_queries > 1:
        print(f"\nblock-level pass: M={num_queries} routed inputs over the same sources (forward)")
        block = {f"naive x{num_queries}": naive_stacked_route, f"ref x{num_queries}": reference_route}
        print(f"{'K':>3} {'impl':>12} | {'fwd ms':>8} {'GB/s':>7} {'of copy':>7} {'x naive':>7}")
        for num_sources in args.sources:
            sources, weights = make_inputs(num_sources, num_queries, args.tokens, args.hidden, dtype, device)
            times = {}
            with torch.no_grad():
                for name, fn in block.items():
                    times[name] = best_time(args.repeats, device, each_query, fn, sources, weights, eps)
                if kernels.supports(sources):
                    times["fused block"] = best_time(args.repeats, device, fused_route_block, sources, weights, eps)
            naive = times[f"naive x{num_queries}"]
            for name, seconds in times.items():
                gbs = (num_sources + num_queries) * unit / seconds / 1e9
                print(f"{num_sources:>3} {name:>12} | {seconds * 1e3:>8.2f} {gbs:>7.1f} {gbs / copy:>7.0%} "
                      f"{naive / seconds:>7.2f}")
            del sources


if __name__ == "__main__":
    main()
