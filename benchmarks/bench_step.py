"""Training-step time and peak memory of the routed variants against the standard model.

    python benchmarks/bench_step.py                        # CPU default (small shape): ~1 min
    python benchmarks/bench_step.py --shape 1b             # GPU: the paper's 1044M (d1280 L36), bf16,
                                                           # as examples/configs/paper_1044m.yaml
    python benchmarks/bench_step.py --shape 1b --routing reference   # GPU, DepthRoute instead of
                                                                     # the fused kernel (A/B)

One step = Megatron's forward_backward_func over one micro-batch + the Megatron optimizer step
(AdamW), built by megatron_delta.train exactly as `megatron-delta train` does. Each variant runs in
its own fresh process (one rank, Megatron mesh 1x1; gloo + cpu_shim on CPU, NCCL on GPU), so that
peak memory is not shared between variants. Reported per variant, with ratios to standard:
    step     best of --steps timed steps, after --warmup steps (optimizer state allocated);
             GPU wall time, CPU process time (one thread)
    peak     GPU: torch.cuda.max_memory_allocated over the timed steps; CPU: peak resident set
             (Linux VmHWM, reset via /proc/self/clear_refs) over the timed steps minus the
             resident set before the model was built, i.e. model + optimizer + activations,
             with glibc's mmap threshold pinned so that freed tensors leave the resident set
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

import torch

from bench_routing import device_description

VARIANTS = ("standard", "delta_block", "delta", "attnres_block")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    # A fraction of a second per step on one CPU core (routing cost relative to the matmuls is
    # ~K/h, so large at h=128: an upper bound of the overhead, not a prediction for 1B).
    "small": (None, ["model.num_layers=8", "model.hidden_size=128", "model.num_attention_heads=4",
                     "model.ffn_hidden_size=352", "model.seq_length=256", "model.vocab_size=1024",
                     "training.micro_batch_size=2"]),
    # The paper's 1044M model (d1280 L36, GQA 20/4 heads, FFN 5120, Qwen3 vocabulary, seq 2048,
    # micro-batch 2) exactly as the project's training recipe configures it.
    "1b": (os.path.join(REPO, "examples", "configs", "paper_1044m.yaml"), []),
}


def run_config(shape: str, variant: str, num_blocks: int, transformer_impl: str | None):
    """The shape's RunConfig on one rank: one micro-batch per step, plain (non-distributed) optimizer."""
    from megatron_delta.run_config import load_run_config

    path, overrides = SHAPES[shape]
    cfg = load_run_config(path, overrides)
    one_rank = [f"delta.variant={variant}", f"delta.num_blocks={num_blocks}",
                f"training.global_batch_size={cfg.training.micro_batch_size}", "parallel.data_parallel_size=null",
                "parallel.use_distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
                "training.lr_warmup_iters=0"]
    if transformer_impl:
        one_rank.append(f"model.transformer_impl={transformer_impl}")
    return load_run_config(path, overrides + one_rank)


def memory_status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+) kB", status.read()).group(1)) * 1024


def worker(args) -> dict:
    """One variant in this process: build, warm up, time `steps` training steps."""
    from megatron_delta import mesh, train
    from megatron_delta.run_config import build_transformer_config, padded_vocab_size

    cfg = run_config(args.shape, args.worker, args.num_blocks, args.transformer_impl)
    device = mesh.start_world()
    mesh.init_model_parallel_of(cfg.parallel)
    train.init_training(cfg)
    on_gpu = device.type == "cuda"
    resident_before_model = None if on_gpu else memory_status("VmRSS")
    config = build_transformer_config(cfg, on_gpu)
    model = train.build_model(cfg, config, padded_vocab_size(cfg, cfg.model.vocab_size), on_gpu)
    optimizer, scheduler = train.build_optimizer(cfg, config, model)
    train.wire_model_config(config, cfg, model, optimizer)
    trainer = train.Trainer(cfg, config, model, optimizer, scheduler, device)

    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, -1)}
    batch = {key: value.to(device) for key, value in batch.items()}

    # GPU: wall time. CPU: this process's CPU time (one thread), which other processes on a
    # shared host do not inflate the way they inflate wall time.
    clock = time.perf_counter if on_gpu else time.process_time

    def step():
        if on_gpu:
            torch.cuda.synchronize()
        start = clock()
        trainer.train_step([batch], collect_routing=False)
        if on_gpu:
            torch.cuda.synchronize()
        return clock() - start

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak (VmHWM) to the current resident set
    times = [step() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if on_gpu else memory_status("VmHWM") - resident_before_model
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    mesh.stop_world()
    return {"step_s": min(times), "median_step_s": sorted(times)[len(times) // 2], "peak_bytes": peak,
            "params": params, "transformer_impl": cfg.model.transformer_impl}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--routing", choices=("fused", "reference"), default="fused",
                        help="GPU: the Triton kernel or DepthRoute (CPU always runs DepthRoute)")
    parser.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default=None,
                        help="default: the shape's (small: local; 1b: transformer_engine, as the recipe)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    on_gpu = torch.cuda.is_available()
    torch.set_num_threads(1)  # as the CPU workers (mesh.start_world)
    device = torch.device("cuda" if on_gpu else "cpu")
    precision = "bf16" if on_gpu else "fp32"
    print(f"bench_step | {datetime.date.today()} | {device_description(device)}, {precision} | "
          f"torch {torch.__version__} | shape {args.shape} | num_blocks {args.num_blocks} | "
          f"routing {args.routing if on_gpu else 'reference'} | best of {args.steps} steps after {args.warmup}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               MEGATRON_DELTA_FUSED_ROUTING="1" if args.routing == "fused" else "0")
    results = {}
    for variant in args.variants:
        command = [sys.executable, __file__, "--worker", variant, "--shape", args.shape, "--num-blocks",
                   str(args.num_blocks), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.transformer_impl:
            command += ["--transformer-impl", args.transformer_impl]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    base = results.get("standard")
    print(f"{'variant':>14} | {'params':>12} | {'step ms':>9} {'median':>9} {'x std':>6} | "
          f"{'peak MiB':>9} {'x std':>6}")
    for variant, r in results.items():
        step_ratio = f"{r['step_s'] / base['step_s']:.3f}" if base else "-"
        peak_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if base else "-"
        print(f"{variant:>14} | {r['params']:>12,} | {r['step_s'] * 1e3:>9.1f} {r['median_step_s'] * 1e3:>9.1f} "
              f"{step_ratio:>6} | {r['peak_bytes'] / 2**20:>9.1f} {peak_ratio:>6}")
    print(f"layers: {r['transformer_impl']} spec")


if __name__ == "__main__":
    main()
