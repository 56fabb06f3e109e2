"""What a training run reports, and where: the console, <logging.dir>/metrics.jsonl (one JSON
object per event; a resumed run appends, so a step may appear twice and the later line wins) and
TensorBoard scalars under <logging.dir>/tensorboard. Rank 0 writes; every rank takes part in the
reductions, so every rank calls the same methods.

    log = MetricsLogger(cfg, device)
    log.begin(iteration)                                  the clocks start (after a resume: its step)
    log.step_done(loss, seconds, timed)                   every step: [loss sum, tokens], its time
    log.log_step(step, lr, grad_norm, routing, moe)      at log_interval: the interval's line
    log.log_eval(step, val_loss)                          validation loss and perplexity
    log.finish(step, val_loss, run_summary)               the closing record and summary line
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import time

import torch
from megatron.core import parallel_state

from megatron_delta.mesh import is_logging_rank


def all_ranks_sum(loss: torch.Tensor) -> torch.Tensor:
    """Sum a [loss sum, token count] over data-parallel ranks, then over pipeline stages (only the
    last stage holds nonzero values), so that every rank gets the global numbers."""
    loss = loss.clone()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss


def token_mean(loss: torch.Tensor) -> float:
    """The global token-mean loss of a local [loss sum, token count]."""
    loss_sum, tokens = all_ranks_sum(loss).tolist()
    return loss_sum / tokens


def routing_sharpness(routing: dict) -> tuple[float, float] | None:
    """(mean max routing weight, mean routing entropy) over the sublayers that choose between at
    least two sources (with one source the weight is trivially 1); None if there are none."""
    routed = [stats for stats in routing.values() if stats["num_sources"] > 1]
    if not routed:
        return None
    return (
        sum(s["max_weight"] for s in routed) / len(routed),
        sum(s["entropy"] for s in routed) / len(routed),
    )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the busiest rank: allocated CUDA memory on GPUs, resident set size on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak = torch.tensor([peak], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return int(peak.item())


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class MetricsLogger:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.enabled = is_logging_rank()
        self.tokens_per_step = cfg.training.global_batch_size * cfg.model.seq_length
        self.interval_loss = torch.zeros(2, device=device)
        self.train_loss = None
        self.routing = {}  # the last routing statistics with 2+ sources somewhere
        # Throughput of the training steps alone (no evaluation or checkpoint time), leaving out the
        # steps the caller does not time (warm-up, routing statistics' host syncs), so that
        # variants compare on equal terms.
        self.timed_seconds, self.timed_steps = 0.0, 0
        self.begin(0)
        self.jsonl = self.tensorboard = None
        if not self.enabled:
            return
        os.makedirs(cfg.logging.dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.logging.dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.logging.dir, "tensorboard"))

    def begin(self, iteration: int) -> None:
        """The clocks start: training begins (or resumes) at `iteration`."""
        self.start = self.interval_start = time.time()
        self.start_iteration = self.interval_start_iteration = iteration

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def record(self, step: int, values: dict, routing: dict | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values, **({"routing": routing} if routing else {})}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):  # per-expert loads (a mapping) go to metrics.jsonl only
                    self.tensorboard.add_scalar(name, value, step)
            for label, stats in (routing or {}).items():
                self.tensorboard.add_scalar(f"routing_max_weight/{label}", stats["max_weight"], step)
                self.tensorboard.add_scalar(f"routing_entropy/{label}", stats["entropy"], step)

    def step_done(self, loss: torch.Tensor, seconds: float, timed: bool) -> None:
        """A finished step's local [loss sum, token count] and wall time."""
        self.interval_loss += loss
        if timed:
            self.timed_seconds, self.timed_steps = self.timed_seconds + seconds, self.timed_steps + 1

    def log_step(self, step: int, lr: float, grad_norm, routing: dict, moe_values: dict) -> None:
        """The line and record of the steps since the last one (a collective: every rank calls it)."""
        train_iters = self.cfg.training.train_iters
        self.train_loss = token_mean(self.interval_loss)
        self.interval_loss.zero_()
        now = time.time()
        seconds_per_step = (now - self.start) / (step - self.start_iteration)
        values = {
            "loss": self.train_loss,
            "lr": lr,
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "tokens_per_s": (step - self.interval_start_iteration) * self.tokens_per_step / (now - self.interval_start),
            "elapsed_s": now - self.start,
        }
        line = (
            f"step {step:>{len(str(train_iters))}}/{train_iters} | loss {self.train_loss:.4f} | "
            f"lr {lr:.2e} | grad norm {values['grad_norm']:.3f} | "
            f"{values['tokens_per_s'] / 1e3:.1f}k tok/s | {_clock(now - self.start)} elapsed, "
            f"ETA {_clock((train_iters - step) * seconds_per_step)}"
        )
        sharpness = routing_sharpness(routing)
        if sharpness:
            self.routing = routing
            values["routing_max_weight"], values["routing_entropy"] = sharpness
            line += f" | routing max-w {sharpness[0]:.3f} H {sharpness[1]:.3f}"
        values.update(moe_values)
        line += "".join(f" | {name.removeprefix('moe_')} {value:.4f}" for name, value in moe_values.items()
                        if name.startswith("moe_"))
        self.print(line)
        self.record(step, values, routing=routing)
        self.interval_start, self.interval_start_iteration = now, step

    def log_eval(self, step: int, val_loss: float, echo: bool = True) -> None:
        if echo:
            self.print(f"eval at step {step} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
        self.record(step, {"val_loss": val_loss, "val_ppl": math.exp(val_loss)})

    def finish(self, step: int, val_loss: float, run_summary: dict) -> None:
        """The last record of a finished run (what `megatron-delta compare` reads) and the summary line."""
        if self.timed_steps:
            run_summary["train_tokens_per_s"] = self.timed_steps * self.tokens_per_step / self.timed_seconds
        self.record(step, run_summary)
        summary = f"done: {step} steps in {_clock(time.time() - self.start)}"
        if self.train_loss is not None:
            summary += f" | train loss {self.train_loss:.4f}"
        summary += f" | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}"
        if self.routing:
            max_weight, entropy = routing_sharpness(self.routing)
            routed = sum(stats["num_sources"] > 1 for stats in self.routing.values())
            summary += (f" | routing: mean max weight {max_weight:.3f}, entropy {entropy:.3f} over the "
                        f"{routed} sublayers with 2+ sources (see megatron-delta plot-routing {self.cfg.logging.dir})")
        self.print(summary)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
