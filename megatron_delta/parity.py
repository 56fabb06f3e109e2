"""Mesh parity: prove that a parallel layout computes the same loss and gradients as one process.

`run_parity(mesh, problem)` runs on every rank of a torch.distributed world:

1. reference: model-parallel state TP=1, PP=1; every rank builds the whole model and runs the whole
   global batch in one process-local autograd loop (fp32, dropout 0, fixed seed, deterministic
   synthetic tokens), keeping its weights, loss and gradients;
2. mesh: re-initialise the model-parallel state with the target layout (TP, PP, virtual PP,
   sequence parallel, DP = world / (TP x PP), distributed optimizer, activation recompute), build
   the local model chunk(s), load the reference weights into them, wrap them in Megatron's
   DistributedDataParallel and run Megatron's own schedule (`get_forward_backward_func`: 1F1B or
   interleaved) with each DP rank on its slice of the global batch; the schedule calls
   `finalize_model_grads` (DP / sequence-parallel / tied-embedding reductions);
3. compare the mesh loss and every local `main_grad` with the matching slice of the reference
   gradient. With `steps > 1` both sides run that many iterations with Adam steps in between
   (torch AdamW on the reference, Megatron's optimizer - distributed or not - on the mesh); the
   losses of every iteration and the gradients of the last one are compared. Per-rank results
   are all-gathered, so every rank returns the same report and the same pass/fail (one failing
   rank cannot leave the others waiting in a collective).

`main(argv)` is `megatron-delta parity` (launch with torchrun).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

import torch

from megatron_delta import DeltaResidualConfig, compat, link_virtual_stages, pipeline_seq_length
from megatron_delta.config import MOE_DISPATCHERS, VARIANTS
from megatron_delta.mesh import destroy_model_parallel, init_model_parallel, set_seeds, start_world, stop_world
from megatron_delta.parameters import is_expert_parameter
from megatron_delta.run_config import (
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    build_model_chunk,
    build_transformer_config,
)
from megatron_delta.train import forward_step, mtp_loss

DEFAULT_TOLERANCE = 1e-5  # relative, fp32: observed agreement is <= 1e-6


@dataclasses.dataclass(frozen=True)
class Mesh:
    """A parallel layout. Data parallelism fills the world: dp = world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sp: bool = False
    dist_opt: bool = False
    recompute: str = "none"  # none | full | selective
    ep: int = 1  # expert parallelism (MoE problems): experts split over ep ranks of the DP x TP ranks
    etp: int | None = None  # expert tensor parallelism; None: Megatron's default (= tp)

    def describe(self, world_size: int) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        parts.append(f"DP{world_size // (self.tp * self.pp)}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp is not None:
            parts.append(f"ETP{self.etp}")
        if self.sp:
            parts.append("SP")
        if self.dist_opt:
            parts.append("dist-opt")
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The model and batch both sides compute (tiny by default: a parity run, not a benchmark)."""

    variant: str = "standard"
    num_blocks: int = 2
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    seq: int = 16
    micro_batch: int = 2
    global_batch: int = 16  # >= 4 micro-batches per DP rank: the interleaved schedule's steady state
    vocab: int = 128
    seed: int = 1234
    steps: int = 1  # iterations; Adam steps between them (grads compared after the last one)
    num_experts: int | None = None  # MoE layers (every layer) with this many experts; None: dense
    moe_topk: int = 2
    dispatcher: str = "allgather"  # MoE token dispatcher: allgather | alltoall
    mtp: int | None = None  # multi-token prediction layers (their loss reaches the gradients compared)


@dataclasses.dataclass
class ParityReport:
    mesh: str
    losses_ref: list  # mean loss of the global batch, one per iteration
    losses_mesh: list
    grad_errors: dict  # reference param name -> (max |diff|, max |diff| / max |ref grad|), last iteration
    tolerance: float
    failures: list = dataclasses.field(default_factory=list)  # "rank N: error" from ranks that raised

    @property
    def loss_rel_error(self) -> float:
        if not self.losses_ref or len(self.losses_mesh) != len(self.losses_ref):
            return float("nan")  # a rank failed before reporting
        return max(abs(m - r) / abs(r) for m, r in zip(self.losses_mesh, self.losses_ref))

    @property
    def worst_param(self) -> str:
        return max(self.grad_errors, key=lambda name: self.grad_errors[name][1], default="-")

    @property
    def max_grad_rel_error(self) -> float:
        return self.grad_errors[self.worst_param][1] if self.grad_errors else float("nan")

    @property
    def passed(self) -> bool:
        # Written so that NaN fails.
        return not self.failures and (
            self.loss_rel_error <= self.tolerance and self.max_grad_rel_error <= self.tolerance
        )

    def table(self) -> str:
        last = lambda losses: losses[-1] if losses else float("nan")  # noqa: E731
        header = f"{'mesh':<30} {'loss ref':>10} {'loss mesh':>10} {'loss rel':>9} {'grad rel':>9}  worst param"
        row = (
            f"{self.mesh:<30} {last(self.losses_ref):>10.6f} {last(self.losses_mesh):>10.6f} "
            f"{self.loss_rel_error:>9.2e} {self.max_grad_rel_error:>9.2e}  {self.worst_param}"
        )
        verdict = "PASS" if self.passed else "FAIL"
        summary = (
            f"{verdict}: {len(self.losses_ref)} iteration(s), {len(self.grad_errors)} params, "
            f"tolerance {self.tolerance:g} relative"
        )
        return "\n".join([header, row, summary] + self.failures)


GRAD_FLOOR = 1e-12  # reference gradients below this magnitude count as zero in relative errors
ADAM_LR = 1e-2
# Adam's update is ~lr * sign(g) where |g| << eps: with eps=1e-8 that turns 1e-7 rounding
# differences of near-zero gradients into lr-sized parameter differences between meshes.
ADAM_EPS = 1e-3
# MoE problems: the load-balancing loss weight (its term is part of the compared loss) and the
# router z-loss weight (its gradient is compared; its value is not part of the compared loss, as
# Megatron records it per rank, unreduced over TP and DP, so it depends on the mesh).
MOE_AUX_LOSS_COEFF = 1e-2
MOE_Z_LOSS_COEFF = 1e-3


def run_config(problem: Problem, mesh: Mesh) -> RunConfig:
    """The trainer's run config of this problem on this mesh: parity builds its models with the
    trainer's builders (run_config.build_transformer_config / build_model_chunk) and runs the
    trainer's forward step and per-token loss, so it checks the trainer's wiring. What makes it
    a parity run is in the fields: fp32, dropout 0 (the defaults), weights built on the host and
    sliced (CPU), the model shape of the parity problem (LayerNorm, GELU, biases on dense models)."""
    recompute = {
        "none": {},
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "selective": dict(recompute_granularity="selective"),
    }[mesh.recompute]
    moe = {} if problem.num_experts is None else dict(
        num_moe_experts=problem.num_experts, moe_router_topk=problem.moe_topk,
        moe_aux_loss_coeff=MOE_AUX_LOSS_COEFF, moe_z_loss_coeff=MOE_Z_LOSS_COEFF, moe_ffn_hidden_size=problem.hidden,
    )
    return RunConfig(
        model=ModelConfig(
            num_layers=problem.layers, hidden_size=problem.hidden, num_attention_heads=problem.heads,
            seq_length=problem.seq, vocab_size=problem.vocab, normalization="LayerNorm", activation="gelu",
            add_bias_linear=problem.num_experts is None, mtp_num_layers=problem.mtp, **moe,
        ),
        delta=DeltaResidualConfig(variant=problem.variant, num_blocks=problem.num_blocks),
        parallel=ParallelConfig(
            tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=mesh.pp,
            virtual_pipeline_model_parallel_size=mesh.vpp, sequence_parallel=mesh.sp,
            use_distributed_optimizer=mesh.dist_opt, expert_model_parallel_size=mesh.ep,
            expert_tensor_parallel_size=mesh.etp, moe_token_dispatcher_type=problem.dispatcher,
        ),
        training=TrainingConfig(micro_batch_size=problem.micro_batch, global_batch_size=problem.global_batch,
                                precision="fp32", seed=problem.seed, **recompute),
    )


def _transformer_config(problem: Problem, mesh: Mesh):
    return build_transformer_config(run_config(problem, mesh), on_gpu=torch.cuda.is_available())


def _build_chunk(problem: Problem, config, vp_stage):
    """This rank's model chunk for virtual stage `vp_stage`, as the trainer builds it (the model
    fields of the run config do not depend on the mesh; `config` carries the mesh)."""
    return build_model_chunk(run_config(problem, Mesh()), config, problem.vocab, vp_stage=vp_stage)


def _microbatches(problem: Problem, device) -> list:
    """The deterministic synthetic global batch, as the trainer's micro-batches (tokens,
    position_ids, labels, loss_mask: every token counts)."""
    generator = torch.Generator().manual_seed(problem.seed)
    tokens = torch.randint(problem.vocab, (problem.global_batch, problem.seq + 1), generator=generator)
    position_ids = torch.arange(problem.seq).expand(problem.micro_batch, -1)
    return [
        dict(
            tokens=tokens[i : i + problem.micro_batch, :-1].to(device),
            position_ids=position_ids.to(device),
            labels=tokens[i : i + problem.micro_batch, 1:].to(device),
            loss_mask=torch.ones(problem.micro_batch, problem.seq, device=device),
        )
        for i in range(0, problem.global_batch, problem.micro_batch)
    ]


def _reference_name(chunk, name: str) -> str:
    """Name of a mesh parameter in the one-process model: local layer index -> global
    `layer_number`, local expert index -> global expert index (expert-parallel rank x local
    experts + index), the tied output weight of the last stage -> the word embeddings."""
    from megatron.core import parallel_state

    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if parts[3:6] == ["mlp", "experts", "local_experts"]:
            local_experts = len(layer.mlp.experts.local_experts)
            parts[6] = str(parallel_state.get_expert_model_parallel_rank() * local_experts + int(parts[6]))
    elif name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


def _local_slice(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's part of a full reference tensor: split over tensor parallelism, or over expert
    tensor parallelism for expert weights (`allreduce=False`: reduced over the expert data-parallel
    group); params without `tensor_model_parallel` are replicated."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    if is_expert_parameter(param):
        rank, size = parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()
    else:
        rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(size, dim=param.partition_dim)[rank]


def _gather_reduce_scattered_grads(ddp_chunks) -> None:
    """With the distributed optimizer, finalize_model_grads reduce-scatters: a DP rank holds the
    reduced gradient only in its own shard of each bucket (the rest is its local, unreduced
    gradient). All-gather the shards so that every main_grad can be compared (expert params:
    over the expert data-parallel group their buckets use)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for ddp in ddp_chunks:
        for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            size = bucket_group.intra_distributed_optimizer_instance_size
            rank = bucket_group.intra_distributed_optimizer_instance_rank
            for bucket in bucket_group.buckets:
                own_shard = shard_buffer(bucket.grad_data, size)[rank].clone()
                torch.distributed.all_gather_into_tensor(
                    bucket.grad_data, own_shard, group=bucket_group.intra_distributed_optimizer_instance_group
                )


def _check_layout(problem: Problem, mesh: Mesh, world_size: int) -> None:
    """What cannot run, found before any group is built and identically on every rank: the
    parity problem's own bounds, then the trainer's checks of its run config (the mesh against
    the world, shapes against the mesh, experts against the mesh, Megatron's own)."""
    if problem.steps < 1:
        raise ValueError(f"steps={problem.steps} must be >= 1")
    if mesh.recompute not in ("none", "full", "selective"):
        raise ValueError(f"recompute={mesh.recompute!r}: choose none, full or selective")
    if problem.num_experts is None and mesh.etp is not None:
        raise ValueError("expert tensor parallelism (etp) needs an MoE problem (num_experts)")
    if problem.num_experts is not None:
        if problem.dispatcher not in MOE_DISPATCHERS:
            raise ValueError(f"dispatcher={problem.dispatcher!r}: choose one of {', '.join(MOE_DISPATCHERS)}")
        if not 1 <= problem.moe_topk <= problem.num_experts:
            raise ValueError(f"moe_topk={problem.moe_topk} must be in [1, num_experts={problem.num_experts}]")
    cfg = run_config(problem, mesh)
    cfg.validate(world_size)
    build_transformer_config(cfg, on_gpu=False)


def _run_reference(problem: Problem, device):
    """Whole model, whole global batch, one process: (initial params, last grads, losses)."""
    init_model_parallel()
    set_seeds(problem.seed)
    config = _transformer_config(problem, Mesh())
    model = _build_chunk(problem, config, vp_stage=None).to(device)
    initial_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAM_LR, eps=ADAM_EPS, weight_decay=0.0)
    microbatches = _microbatches(problem, device)
    compat.clear_moe_aux_losses()  # a failed earlier run may have left records
    compat.take_mtp_losses(problem.mtp or 1)
    # What Megatron's schedule and finalize_model_grads do with calculate_per_token_loss: each
    # micro-batch backpropagates its loss sum, the MoE / MTP losses attached to the activations
    # get a backward scale of 1, and the gradients are divided by the global batch's token count.
    tokens = sum(batch["loss_mask"].sum() for batch in microbatches)
    if problem.num_experts is not None:
        from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device) / tokens)
    if problem.mtp:
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

        MTPLossAutoScaler.set_loss_scale(torch.ones(1, device=device) / tokens)
    losses = []
    for iteration in range(problem.steps):
        model.zero_grad()
        loss_sum = 0.0
        for batch in microbatches:
            output, loss_func = forward_step(iter([batch]), model)
            loss, _, _ = loss_func(output)
            (loss / tokens).backward()
            loss_sum += loss.item()
        losses.append(loss_sum / tokens.item() + _moe_aux_loss(problem, len(microbatches))
                      + _mtp_loss(config, len(microbatches), device))
        if iteration < problem.steps - 1:
            optimizer.step()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return initial_params, grads, losses


def _run_mesh(problem: Problem, mesh: Mesh, ref_params: dict, device):
    """Megatron's schedule (and optimizer between iterations) on the target layout:
    (this rank's chunks, DP-averaged losses; None on ranks that are not the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_model_parallel(mesh.tp, mesh.pp, mesh.vpp, mesh.ep, mesh.etp)
    set_seeds(problem.seed)
    config = _transformer_config(problem, mesh)
    chunks = []
    for vp_stage in range(mesh.vpp) if mesh.vpp else [None]:
        chunk = _build_chunk(problem, config, vp_stage).to(device)
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                param.copy_(_local_slice(ref_params[_reference_name(chunk, name)], param))
        chunks.append(chunk)
    link_virtual_stages(chunks)

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=mesh.dist_opt)
    ddp_chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    no_sync = [ddp.no_sync for ddp in ddp_chunks]
    config.no_sync_func = no_sync if mesh.vpp else no_sync[0]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=ADAM_LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=0.0,
            use_distributed_optimizer=mesh.dist_opt,
        ),
        ddp_chunks,
    )

    dp_group = parallel_state.get_data_parallel_group()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    microbatches = _microbatches(problem, device)
    per_dp = len(microbatches) // dp_size
    own = microbatches[dp_rank * per_dp : (dp_rank + 1) * per_dp]
    last_stage = parallel_state.is_pipeline_last_stage()
    losses = []
    for iteration in range(problem.steps):
        for ddp in ddp_chunks:
            ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(own) for _ in ddp_chunks] if mesh.vpp else iter(own),
            model=ddp_chunks,
            num_microbatches=per_dp,
            seq_length=pipeline_seq_length(chunks[0].delta, config, problem.seq),
            micro_batch_size=problem.micro_batch,
        )
        # [loss sum, token count] over DP (only last-stage ranks hold losses; the others reduce zeros).
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        if last_stage:
            totals += torch.stack([r["lm loss"] for r in reduced]).sum(0)
        torch.distributed.all_reduce(totals, group=dp_group)
        losses.append((totals[0] / totals[1]).item() + _moe_aux_loss(problem, per_dp)
                      + _mtp_loss(config, per_dp, device))
        if iteration < problem.steps - 1:
            optimizer.step()
    if mesh.dist_opt:
        _gather_reduce_scattered_grads(ddp_chunks)
    return chunks, (losses if last_stage else None)


def _moe_aux_loss(problem: Problem, num_microbatches: int) -> float:
    """The weighted load-balancing loss of an iteration (summed over MoE layers, averaged over
    micro-batches and data-parallel ranks), read from Megatron's aux-loss tracker, which is then
    cleared; 0 for dense problems. Collective."""
    if problem.num_experts is None:
        return 0.0
    per_layer = compat.moe_aux_losses(["load_balancing_loss"], problem.layers + (problem.mtp or 0))["load_balancing_loss"]
    compat.clear_moe_aux_losses()
    return MOE_AUX_LOSS_COEFF * per_layer.sum().item() / num_microbatches


def _mtp_loss(config, num_microbatches: int, device) -> float:
    """The weighted multi-token-prediction loss of an iteration (mtp_loss_scaling_factor x the
    trainer's unweighted MTP loss, from Megatron's MTP loss tracker, which is then cleared); 0
    without MTP. Collective."""
    if not config.mtp_num_layers:
        return 0.0
    recorded = compat.take_mtp_losses(config.mtp_num_layers).to(device)
    return config.mtp_loss_scaling_factor * mtp_loss(recorded, num_microbatches)


def _grad_errors(chunks, ref_grads: dict) -> dict:
    errors = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            ref_name = _reference_name(chunk, name)
            ref = ref_grads[ref_name]
            diff = (param.main_grad.float() - _local_slice(ref, param)).abs().max().item()
            rel = diff / max(ref.abs().max().item(), GRAD_FLOOR)
            errors[ref_name] = max(errors.get(ref_name, (0.0, 0.0)), (diff, rel), key=lambda e: e[1])
    return errors


def _compare_on_this_rank(problem: Problem, mesh: Mesh, device):
    """(reference losses, reference param names, this rank's result); keeps no model alive, so
    that destroying the process groups afterwards really frees them."""
    ref_params, ref_grads, ref_losses = _run_reference(problem, device)
    chunks, mesh_losses = _run_mesh(problem, mesh, ref_params, device)
    result = dict(losses=mesh_losses, errors=_grad_errors(chunks, ref_grads), failure=None)
    return ref_losses, list(ref_grads), result


def run_parity(mesh: Mesh, problem: Problem = Problem(), tolerance: float = DEFAULT_TOLERANCE) -> ParityReport:
    """Collective: call on every rank of an initialised torch.distributed world; every rank gets
    the same report. Leaves the model-parallel state (and its process groups) destroyed."""
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _check_layout(problem, mesh, world_size)
    ref_losses, ref_names = [], []
    try:
        ref_losses, ref_names, local = _compare_on_this_rank(problem, mesh, device)
    except Exception as error:  # reported by every rank below instead of leaving the others waiting
        # The innermost frame outside torch says where Megatron (or we) called what failed.
        where = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename][-1]
        local = dict(losses=None, errors={}, failure=f"rank {rank}: {type(error).__name__}: {error} "
                                                       f"({where.filename}:{where.lineno})")
    finally:
        destroy_model_parallel()

    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    failures = [r["failure"] for r in gathered if r["failure"]]
    grad_errors = {}
    for rank_result in gathered:
        for name, error in rank_result["errors"].items():
            grad_errors[name] = max(grad_errors.get(name, (0.0, 0.0)), error, key=lambda e: e[1])
    missing = {name for name in ref_names if name not in grad_errors} if not failures else set()
    if missing:
        failures.append(f"no mesh rank holds the reference params {sorted(missing)}")
    mesh_losses = [r["losses"] for r in gathered if r["losses"] is not None]
    # Every last-stage rank reports the DP-averaged losses; keep the worst.
    worst = max(mesh_losses, key=lambda losses: max(abs(m - r) for m, r in zip(losses, ref_losses)), default=[])
    return ParityReport(mesh.describe(world_size), ref_losses, worst, grad_errors, tolerance, failures)


def _parser() -> argparse.ArgumentParser:
    defaults = Problem()
    parser = argparse.ArgumentParser(
        prog="megatron-delta parity",
        description="Compare a parallel mesh against one process (loss and every gradient). "
        "Launch under torchrun; data parallelism fills the world: dp = world / (tp x pp). "
        "Example: torchrun --nproc_per_node=4 examples/parity_check.py --tp 2 --pp 2 --variant delta_block",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    parser.add_argument("--sp", action="store_true",
                        help="sequence parallelism (needs --tp > 1; implied by --tp > 1 with --ep > 1, as Megatron requires)")
    parser.add_argument("--dist-opt", action="store_true", help="Megatron's distributed optimizer")
    parser.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (needs --num-experts)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    parser.add_argument("--num-experts", type=int, default=None, help="MoE model: experts per MoE layer")
    parser.add_argument("--moe-topk", type=int, default=defaults.moe_topk, help="experts per token")
    parser.add_argument("--dispatcher", choices=MOE_DISPATCHERS, default=defaults.dispatcher,
                        help="MoE token dispatcher")
    parser.add_argument("--mtp", type=int, default=None,
                        help="multi-token prediction layers (their loss is in the compared gradients)")
    parser.add_argument("--variant", choices=VARIANTS, default=defaults.variant)
    parser.add_argument("--num-blocks", type=int, default=defaults.num_blocks, help="blocks of the block variants")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--seq", type=int, default=defaults.seq)
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--global-batch", type=int, default=defaults.global_batch)
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="iterations, with Adam steps between them (grads compared after the last)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max relative error of the loss and of every gradient")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("megatron-delta parity: launch under torchrun, e.g. "
              "torchrun --nproc_per_node=4 examples/parity_check.py --tp 2 --pp 2", file=sys.stderr)
        return 2
    start_world()
    # TF32 matmuls differ from fp32 by ~1e-3: far beyond the parity tolerance.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        mesh = Mesh(tp=args.tp, pp=args.pp, vpp=args.vpp, sp=args.sp or (args.tp > 1 and args.ep > 1),
                    dist_opt=args.dist_opt,
                    recompute=args.recompute, ep=args.ep, etp=args.etp)
        problem = Problem(variant=args.variant, num_blocks=args.num_blocks, layers=args.layers,
                          hidden=args.hidden, heads=args.heads, seq=args.seq, micro_batch=args.micro_batch,
                          global_batch=args.global_batch, steps=args.steps, seed=args.seed,
                          num_experts=args.num_experts, moe_topk=args.moe_topk, dispatcher=args.dispatcher,
                          mtp=args.mtp)
        try:
            report = run_parity(mesh, problem, args.tolerance)
        except ValueError as error:  # a layout that cannot run; raised identically on every rank
            if torch.distributed.get_rank() == 0:
                print(f"megatron-delta parity: {error}", file=sys.stderr)
            return 2
        if torch.distributed.get_rank() == 0:
            moe = "" if problem.num_experts is None else (
                f" experts={problem.num_experts} top{problem.moe_topk} {problem.dispatcher} "
                f"(loss includes {MOE_AUX_LOSS_COEFF:g} x load-balancing loss)")
            mtp = f" mtp={problem.mtp} (loss includes the weighted MTP loss)" if problem.mtp else ""
            print(f"variant={problem.variant} layers={problem.layers} hidden={problem.hidden} "
                  f"seq={problem.seq} micro_batch={problem.micro_batch} global_batch={problem.global_batch}{moe}{mtp}")
            print(report.table())
        return 0 if report.passed else 1
    finally:
        stop_world()
