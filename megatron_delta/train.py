"""`megatron-delta train --config RUN.yaml [--set section.key=value ...] [--resume auto|PATH]`

Pre-trains a DeltaGPTModel with Megatron-Core's own training pieces. One process per device:
`torchrun --nproc_per_node=N -m megatron_delta.train --config RUN.yaml` runs the mesh that the
config names (tensor / pipeline / virtual pipeline / sequence / data parallel); without torchrun
it is a one-process run. With CUDA: NCCL and training.precision. Without: gloo, fp32 and
megatron_delta.cpu_shim (Megatron's CUDA-only calls redirected to the CPU).

The loop (_run) hands off to one component per job:
    mesh.session       (megatron_delta.mesh) process group and Megatron mesh; init_training: the
                       micro-batch calculator and seeds
    build_model        DeltaGPTModel chunks (one per virtual stage), Float16Module, DDP
    build_optimizer    get_megatron_optimizer (routers at their own lr) + OptimizerParamScheduler
    BatchSource        this data-parallel rank's micro-batches of global batch i
    Trainer            train_step with forward_backward_func; loss and routing reduction
    Evaluator          (megatron_delta.evaluator) validation loss
    Checkpointer       (megatron_delta.checkpointing) verified saves, safe loading, resume checks
    MetricsLogger      (megatron_delta.metrics) console line, metrics.jsonl, TensorBoard (rank 0)
    PreemptionFlag     SIGTERM / SIGUSR1 -> save at the next step boundary and exit 143

Exit status: 0 finished; 2 bad input: config, command line, data, or a checkpoint that is
incomplete, unsafe or saved with another config (an error line on stderr, nothing trained);
143 (128 + SIGTERM) stopped by SIGTERM or SIGUSR1 after saving a checkpoint: rerun with
`--resume auto`. One run per logging.dir: a second one exits 2 naming the first (run_lock).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import time

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_delta import collect_routing_stats, compat, link_virtual_stages, mesh, pipeline_seq_length
from megatron_delta.checkpointing import CheckpointError, Checkpointer, check_allowed_changes, starting_point
from megatron_delta.data import DataError, build_datasets, build_tokenizer
from megatron_delta.evaluator import Evaluator
from megatron_delta.metrics import MetricsLogger, peak_memory_bytes
from megatron_delta.moe import MoEMonitor
from megatron_delta.parameters import count_parameters, router_lr_overrides
from megatron_delta.run_config import (
    RunConfig,
    RunConfigError,
    build_model_chunk,
    build_transformer_config,
    load_run_config,
    padded_vocab_size,
)
from megatron_delta.run_lock import RunDirectoryBusy, RunDirectoryLock

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "terminated", with a checkpoint to resume from


def init_training(cfg: RunConfig) -> None:
    """After the mesh: Megatron's micro-batch calculator and the seeds. As Megatron-LM, pipeline
    stages draw from different streams (otherwise every stage would initialise its first layer
    identically)."""
    init_num_microbatches_calculator(
        rank=torch.distributed.get_rank(),
        rampup_batch_size=None,
        global_batch_size=cfg.training.global_batch_size,
        micro_batch_size=cfg.training.micro_batch_size,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    mesh.set_seeds(cfg.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def build_model(cfg: RunConfig, config, vocab_size: int, on_gpu: bool) -> list:
    """One DDP-wrapped DeltaGPTModel chunk per virtual pipeline stage of this rank."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.bf16 or config.fp16,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_model_chunk(cfg, config, vocab_size, vp_stage=vp_stage if vpp else None)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if on_gpu:
            model.cuda(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            model = Float16Module(config, model)
        # Only the first chunk's buffers are bucketed for overlap (as Megatron-LM).
        chunks.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=vp_stage > 0))
    link_virtual_stages(chunks)
    return chunks


def build_optimizer(cfg: RunConfig, config, model: list):
    """Megatron's optimizer (AdamW; distributed if configured) and its warmup + decay schedule.
    Routing parameters (parameters.ROUTER_PARAM_PATTERN; not an MoE layer's expert router) get
    lr and min_lr scaled by router_lr_mult."""
    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        initial_loss_scale=t.initial_loss_scale,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    # Passing overrides replaces Megatron's defaults, so start from them (no weight decay on
    # biases and 1-D weights, which includes the routing queries and key-norm weights).
    overrides = get_standard_config_overrides(opt_config)
    overrides.update(router_lr_overrides(opt_config, t.router_lr_mult))
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters or t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        # The config is the source of truth for the schedule; a checkpoint only supplies the
        # step count (so a resumed run may extend train_iters).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def wire_model_config(config, cfg: RunConfig, model: list, optimizer) -> None:
    """The hooks forward_backward_func calls on the TransformerConfig (as Megatron-LM's setup)."""
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in model]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], config.grad_sync_func[0]
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]


def parameter_count(model: list) -> tuple[int, int]:
    """(all parameters, routing parameters) of the whole model: this rank's counts
    (parameters.count_parameters), summed over pipeline ranks."""
    counts = count_parameters(model, parallel_state.get_tensor_model_parallel_world_size(),
                              parallel_state.get_expert_model_parallel_world_size(),
                              parallel_state.get_expert_tensor_parallel_world_size())
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, counts, group=parallel_state.get_pipeline_model_parallel_group())
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


# ---------------------------------------------------------------------------------------------
# Data


class BatchSource:
    """This data-parallel rank's micro-batches, in Megatron's sampler order: global batch i holds
    samples [i * gbs, (i + 1) * gbs) of the dataset, and its micro-batch j on DP rank r holds
    samples i * gbs + (j * dp + r) * mbs ... + mbs. The same global batch therefore trains on
    the same samples whatever the data-parallel size, and resuming needs only the sample count."""

    def __init__(self, dataset, micro_batch_size: int, device: torch.device, num_workers: int):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = device
        self.num_workers = num_workers

    def batches(self, first_sample: int):
        """Endless iterator over micro-batches (dicts of tensors on the device) from first_sample."""
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._indices(first_sample),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            yield {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _indices(self, sample: int):
        while True:
            start = sample + self.dp_rank * self.micro_batch_size
            yield list(range(start, start + self.micro_batch_size))
            sample += self.micro_batch_size * self.dp_size


def forward_step(data_iterator, model):
    """One micro-batch through one model chunk (the schedule calls this; see Megatron-LM's
    pretrain_gpt.forward_step). Non-first stages ignore the tokens, non-last the labels."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"])  # the MTP block masks its losses with it
    return output, functools.partial(token_loss, batch["loss_mask"])


def token_loss(loss_mask, per_token_loss):
    """(sum of masked token losses, token count, {"lm loss": [sum, count]}). With
    calculate_per_token_loss Megatron backpropagates the sum and divides the gradients by the
    token count of the whole global batch."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum()
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), tokens])}


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


class Trainer:
    """Runs global batches through Megatron's pipeline schedule and reduces what it reports."""

    def __init__(self, cfg: RunConfig, config, model: list, optimizer, scheduler, device: torch.device):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.forward_backward = get_forward_backward_func()
        # Pipeline stages exchange the routing sources packed along the sequence dimension.
        self.seq_length = pipeline_seq_length(cfg.delta, config, cfg.model.seq_length)
        self.moe = MoEMonitor(config, model) if config.num_moe_experts else None  # aux losses, expert load
        self.mtp_num_layers = config.mtp_num_layers
        self.mtp_loss = None  # of the last logging step (multi-token prediction only)

    def run_schedule(self, batches: list, forward_only: bool) -> torch.Tensor:
        """[loss sum, token count] of these micro-batches on this rank (zeros off the last stage)."""
        reported = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in self.model],  # every chunk sees every micro-batch
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )
        if not reported:
            return torch.zeros(2, device=self.device)
        return torch.stack([item["lm loss"] for item in reported]).sum(0)

    def train_step(self, batches: list, collect_routing: bool):
        """One optimizer step on one global batch: (loss sum/count, grad norm, routing summary)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        # Needed with the distributed optimizer too: otherwise param.grad aliases main_grad.
        self.optimizer.zero_grad()
        with (collect_routing_stats(self.model) if collect_routing else contextlib.nullcontext() as stats,
              self.moe.step(collect_routing, len(batches)) if self.moe else contextlib.nullcontext()):
            loss = self.run_schedule(batches, forward_only=False)
        if self.mtp_num_layers:  # read and cleared every step, as Megatron's loop does
            recorded = compat.take_mtp_losses(self.mtp_num_layers)
            self.mtp_loss = mtp_loss(recorded.to(self.device), len(batches)) if collect_routing else None
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:  # fp16: a step skipped for inf/nan gradients does not advance the lr
            self.scheduler.step(increment=1)
        routing = gather_routing_summary(stats.summary()) if collect_routing else {}
        return loss, grad_norm, routing


def mtp_loss(per_layer: torch.Tensor, num_microbatches: int) -> float:
    """The unweighted multi-token-prediction loss of a step from what this rank's MTP block
    recorded (compat.take_mtp_losses): the mean over MTP layers of the token-mean loss, averaged
    over micro-batches and data-parallel ranks (recorded on the last pipeline stage, shared with
    every rank). Collective over the data-parallel and pipeline groups."""
    per_layer = per_layer.double()
    torch.distributed.all_reduce(per_layer, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(per_layer, group=parallel_state.get_pipeline_model_parallel_group())
    return per_layer.mean().item() / num_microbatches / parallel_state.get_data_parallel_world_size()


def gather_routing_summary(local: dict) -> dict:
    """Routing statistics of all layers: each pipeline rank measured its own layers (on its
    data-parallel replica's tokens; the logging rank reports DP rank 0's)."""
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, local, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(sorted(item for part in parts for item in part.items()))  # depth order


# ---------------------------------------------------------------------------------------------
# Signals


class PreemptionFlag:
    """SIGTERM (preemption, job time limit, torchrun shutting down) and SIGUSR1 (e.g. SLURM's
    `--signal=USR1@120` warning) only set a flag; at every step boundary the ranks agree on it
    with an all-reduce, so that all of them save the same iteration and exit together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received = False
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: RunConfig, config, allowed_changes=()) -> int:
    with mesh.session(cfg.parallel) as device:
        init_training(cfg)
        try:
            return _run(cfg, config, allowed_changes, device)
        finally:
            destroy_num_microbatches_calculator()


def _run(cfg: RunConfig, config, allowed_changes, device: torch.device) -> int:
    t = cfg.training
    on_gpu = device.type == "cuda"
    log = MetricsLogger(cfg, device)
    start_from, weights_only, notes = starting_point(cfg, allowed_changes, together=True)
    for note in notes:
        log.print(note)
    tokenizer = build_tokenizer(cfg.data)
    eval_samples = t.eval_iters * t.global_batch_size
    train_set, valid_set, _ = build_datasets(cfg.data, tokenizer, cfg.model.seq_length,
                                             (t.train_iters * t.global_batch_size, eval_samples, eval_samples),
                                             t.seed if cfg.data.seed is None else cfg.data.seed)
    model = build_model(cfg, config, padded_vocab_size(cfg, tokenizer.vocab_size), on_gpu)
    optimizer, scheduler = build_optimizer(cfg, config, model)
    wire_model_config(config, cfg, model, optimizer)
    checkpointer = Checkpointer(cfg, model, optimizer, scheduler, say=log.print)
    trainer = Trainer(cfg, config, model, optimizer, scheduler, device)
    evaluate = Evaluator(trainer.run_schedule, model, BatchSource(valid_set, t.micro_batch_size, device,
                                                                  cfg.data.num_workers), t.eval_iters, device)
    params, router_params = parameter_count(model)
    log.print(describe_run(cfg, checkpointer.mesh, params, router_params, on_gpu))

    iteration, consumed = 0, 0
    if start_from is not None:
        iteration, consumed = checkpointer.load(start_from, weights_only)
        log.print(f"loaded model weights from {start_from}" if weights_only else
                  f"resumed from {start_from}: iteration {iteration}, {consumed} samples consumed")
    train_batches = BatchSource(train_set, t.micro_batch_size, device, cfg.data.num_workers).batches(consumed)
    preemption = PreemptionFlag(device)
    log.begin(iteration)
    first_step = iteration + 1
    while iteration < t.train_iters:
        iteration += 1
        log_now = iteration % cfg.logging.log_interval == 0 or iteration == t.train_iters
        step_start = time.time()
        batches = [next(train_batches) for _ in range(get_num_microbatches())]
        loss, grad_norm, routing = trainer.train_step(batches, collect_routing=log_now)
        consumed += t.global_batch_size
        # Not timed: this process's first step (warm-up) and those that collect routing statistics.
        log.step_done(loss, time.time() - step_start, timed=iteration > first_step and not log_now)
        if log_now:
            extra = dict(trainer.moe.last) if trainer.moe else {}
            if trainer.mtp_loss is not None:
                extra["mtp_loss"] = trainer.mtp_loss
            log.log_step(iteration, get_canonical_lr_for_logging(optimizer.param_groups), grad_norm, routing, extra)
        if t.eval_interval and iteration % t.eval_interval == 0 and iteration < t.train_iters:
            log.log_eval(iteration, evaluate())
        if preemption.any_rank():
            checkpointer.save(iteration, consumed)
            log.print(f"stop signal received: checkpoint of step {iteration} in {checkpointer.dir}; exiting "
                      f"with {EXIT_PREEMPTED} (continue with --resume auto)")
            log.close()
            return EXIT_PREEMPTED
        if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
            log.print(f"saved {checkpointer.save(iteration, consumed)}")

    val_loss = evaluate()
    log.log_eval(iteration, val_loss, echo=False)  # the summary line shows it
    if cfg.checkpoint.save_on_exit and (path := checkpointer.save(iteration, consumed)):
        log.print(f"saved {path}")
    log.finish(iteration, val_loss, {"params": params, "routing_params": router_params,
                                     "peak_memory_bytes": peak_memory_bytes(device)})
    log.close()
    return 0


def describe_run(cfg: RunConfig, layout: dict, params: int, router_params: int, on_gpu: bool) -> str:
    t, m = cfg.training, cfg.model
    mesh_text = f"tp {layout['tp']} pp {layout['pp']}" + (f" vpp {layout['vpp']}" if layout["vpp"] else "")
    mesh_text += f" dp {layout['dp']}" + (" sp" if cfg.parallel.sequence_parallel else "")
    if cfg.parallel.expert_model_parallel_size > 1:
        mesh_text += f" ep {cfg.parallel.expert_model_parallel_size}"
    world = torch.distributed.get_world_size()
    backend = f"{world} GPU process(es), nccl, {t.precision}" if on_gpu else f"{world} CPU process(es), gloo, fp32"
    text = (
        f"megatron-delta train: {cfg.delta.variant} | {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{params / 1e6:.2f}M params ({router_params / 1e3:.1f}K routing) | {mesh_text} on {backend} | "
        f"{get_num_microbatches()} micro-batch(es) of {t.micro_batch_size} x {m.seq_length} tokens per rank and step"
    )
    if not on_gpu and t.precision != "fp32":
        text += f"\nnote: training.precision={t.precision} needs a GPU; this CPU run uses fp32"
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-delta train",
        description="Pre-train a Delta Attention Residuals GPT with Megatron-Core. "
        "Multi-process: torchrun --nproc_per_node=N -m megatron_delta.train --config ...",
        epilog=f"exit status: 0 done, 2 bad input (config, command line, data, checkpoint, run directory in "
        f"use), {EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after saving a checkpoint (rerun with --resume auto)",
    )
    parser.add_argument("--config", required=True, help="run config YAML (see examples/configs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), repeatable: --set training.lr=3e-4")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="auto: continue from the newest complete checkpoint if there is one; "
                        "PATH: from that checkpoint (same as --set checkpoint.resume=...)")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="SECTION.FIELD",
                        help="resume although this model/delta/training/data field differs from the "
                        "checkpoint's saved config, repeatable: --allow-config-change training.train_iters")
    return parser.parse_args(argv)


def _error(message) -> int:
    print(f"megatron-delta train: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = args.set + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    lock = None
    try:
        cfg = load_run_config(args.config, overrides)
        cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
        config = build_transformer_config(cfg, on_gpu=torch.cuda.is_available())  # Megatron's own checks
        check_allowed_changes(args.allow_config_change)
        if rank0:  # taken before reading checkpoints: no other run is writing them
            lock = RunDirectoryLock(cfg.logging.dir)
        starting_point(cfg, args.allow_config_change)  # the cheap checks, before the job starts; train() decides
    except (RunConfigError, DataError, CheckpointError, RunDirectoryBusy, OSError) as e:
        if lock is not None:
            lock.release()
        return _error(e)
    try:
        return train(cfg, config, args.allow_config_change)
    except (DataError, CheckpointError) as e:  # found once the data or checkpoint is read, or checksummed
        return _error(e)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":  # through the CLI, which checks the megatron-core release first
    from megatron_delta import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
