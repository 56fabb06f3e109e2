"""Shared pytest setup.

tests/parallel/ holds multi-rank tests that run inside one 4-rank session,
`torchrun --nproc_per_node=4 -m pytest tests/parallel`, which tests/test_parallel_suite.py
launches; a plain `pytest tests` must not collect them in a single process.
"""

import os

import pytest

# More than one intra-op thread is 50-500x slower on small CPU VMs, and torchrun sets this only
# for nproc > 1 (not for the pytest parent); it must be set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The Triton kernels are tested on CPU in Triton's interpreter, which is chosen when triton is
# first imported (megatron.core imports it): decide before anything imports it. route() only
# picks the kernels for CUDA tensors, so this changes nothing else.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

collect_ignore = [] if "WORLD_SIZE" in os.environ else ["parallel"]


def pytest_configure(config):
    """Megatron-Core's CUDA-only calls go to the CPU on machines without CUDA (the CPU shim is
    applied here, once, before any test module is imported); on a GPU machine nothing is patched
    and the tests run on the GPU."""
    import torch

    if not torch.cuda.is_available():
        from megatron_delta import cpu_shim

        cpu_shim.install()


@pytest.fixture(scope="module")
def single_process_world():
    """A one-rank gloo world with TP=PP=1 model-parallel state, for single-process model tests."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
