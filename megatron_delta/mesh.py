"""Process groups and Megatron's model-parallel mesh: the one place that starts and stops them.

    start_world()           torch.distributed from torchrun's environment, or a world of one; on a
                            host without CUDA: gloo, one intra-op thread and megatron_delta.cpu_shim
    init_model_parallel()   Megatron's mesh (TP, PP, VPP, EP, expert TP) on that world
    destroy_model_parallel()  its teardown, including the gloo groups Megatron leaves alive
    set_seeds()             Python, NumPy, torch and Megatron's model-parallel RNG streams
    session()               a command's world + mesh, torn down on exit (train, generate, evaluate)
    one_process()           a world of one with TP = PP = 1 unless the caller has one (convert)
    planning_rank()         a world without communication ("fake" backend) for the planner
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist


class MeshError(ValueError):
    """A command was launched on a world it cannot run on."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_bootstrap() -> None:
    """What every CPU process needs before Megatron runs: its CUDA-only calls redirected, and one
    intra-op thread (more is many times slower on small CPU hosts)."""
    from megatron_delta import cpu_shim

    cpu_shim.install()
    torch.set_num_threads(1)


def start_world() -> torch.device:
    """torch.distributed over torchrun's processes, or a world of one for a plain command; NCCL on
    this rank's GPU, gloo on the CPU. Returns this rank's device."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        _cpu_bootstrap()
        device = torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return device


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1, etp: int | None = None,
                        **megatron_options) -> None:
    """Megatron's mesh on the running world (replacing a previous one)."""
    from megatron.core import parallel_state

    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, **megatron_options,
    )


def init_model_parallel_of(parallel) -> None:
    """The mesh a run config's `parallel:` section describes."""
    init_model_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                        parallel.virtual_pipeline_model_parallel_size, parallel.expert_model_parallel_size,
                        parallel.expert_tensor_parallel_size)


def destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel forgets its process groups but leaves them alive, and
    every gloo group keeps two threads: destroy them too, or each re-initialisation leaks ~40.
    (A group's threads end when its last reference goes; models of a previous layout that sit
    in reference cycles release theirs at the next automatic garbage collection.)"""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from torch.distributed.distributed_c10d import _world

    if not parallel_state.model_parallel_is_initialized():
        return
    parallel_state.destroy_model_parallel()
    # RotaryEmbedding.forward is an lru_cache keyed on the module, which holds its CP group.
    RotaryEmbedding.forward.cache_clear()
    for group in list(_world.pg_map):
        if group is not _world.default_pg:
            dist.destroy_process_group(group)


def stop_world() -> None:
    destroy_model_parallel()
    dist.destroy_process_group()


def set_seeds(seed: int) -> None:
    """Every random stream a run draws from, Megatron's TP-aware ones included (each TP rank gets
    its own dropout stream; the default stream is the same on all of them)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def session(parallel):
    """torch.distributed and the mesh of a run config's `parallel:` section for the duration of a
    command; yields this rank's device."""
    device = start_world()
    try:
        init_model_parallel_of(parallel)
        yield device
    finally:
        stop_world()


@contextlib.contextmanager
def one_process():
    """A world of one (gloo) and a TP = PP = 1 mesh, unless the caller already has them; whatever
    is started here is torn down on exit. MeshError if the caller's world is larger."""
    from megatron.core import parallel_state

    started_world = not dist.is_initialized()
    if started_world:
        if not torch.cuda.is_available():
            _cpu_bootstrap()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    started_mesh = not parallel_state.model_parallel_is_initialized()
    try:
        one_rank = dist.get_world_size() == 1 and (started_mesh or (
            parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
        ))
        if not one_rank:
            raise MeshError("this runs in one process (TP=1, PP=1); run it without torchrun")
        if started_mesh:
            init_model_parallel()
        yield
    finally:
        if started_mesh:
            destroy_model_parallel()
        if started_world:
            dist.destroy_process_group()


@contextlib.contextmanager
def planning_rank(config, pp_rank: int):
    """A one-process world with the "fake" backend (groups of the real sizes, no communication) in
    which this process is TP rank 0 (and expert-parallel rank 0) of pipeline rank `pp_rank` of a
    TransformerConfig's layout, with Megatron's mesh on it. Data parallelism does not change a
    model, so a stage has the fewest ranks that hold both a TP group and an EP x expert-TP group."""
    from megatron.core import parallel_state

    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size or tp
    stage = math.lcm(tp, ep * etp)
    if dist.is_initialized():
        raise MeshError("megatron-delta plan builds its own one-process world; run it in a fresh process "
                        "(torch.distributed is already initialised here)")
    dist.init_process_group("fake", rank=pp_rank * stage, world_size=stage * pp)
    try:
        parallel_state.initialize_model_parallel(
            tp, pp, config.virtual_pipeline_model_parallel_size, create_gloo_process_groups=False,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        )
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    return dist.get_rank() == 0
