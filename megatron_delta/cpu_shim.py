"""Run Megatron-Core (0.16.1 - 0.19.x) on CPU with gloo: tests, the parity check and laptop smoke runs.

`install()` redirects the handful of CUDA calls that Megatron makes unconditionally to the CPU.
Each patch below was found by removing it and watching a real CPU run fail (or silently compute
wrong numbers); see the shared notes on running Megatron on CPU. Never used on GPU machines:
`install()` refuses to run when CUDA is available.
"""

import functools
import logging

import torch

_installed = False


def _cpu_device(device):
    """Map any CUDA device spelling ("cuda", "cuda:0", 0, torch.device("cuda")) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver
        return factory(*args, **kwargs)

    return wrapper


class _CpuStream(torch.cpu.Stream):
    """torch.cpu.Stream whose record_event returns an event: the MoE alltoall dispatcher
    synchronises on it after copying token counts to the host."""

    def record_event(self, event=None):
        return event or torch.cpu.Event()


_CUDA_TYPE_NAMES = ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor")


def install() -> None:
    """Patch torch / Megatron-Core so that Megatron's CUDA-only code paths run on CPU. Idempotent."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_delta.cpu_shim.install() is for CPU-only machines, but CUDA is available; "
            "do not install the CPU shim on GPU runs"
        )

    # Schedules, causal masks, optimizer and clip_grads scalars, dist-ckpt exchange buffers are
    # created with a literal device="cuda" (or torch.cuda.current_device()).
    # `with torch.device(...)` recognises factories by identity in a list it builds on first use:
    # build it from the originals first, or the device context stops applying to them (transformers
    # then materialises the rotary inv_freq buffer of a model loaded with from_pretrained as garbage).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in ("zeros", "ones", "tensor", "empty", "empty_like"):
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    # p2p buffers, DDP grad buffers, TP all-gather outputs and the attention workspace are allocated
    # on torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p communication and dist-ckpt save synchronise the device; CPU ops are already synchronous.
    torch.cuda.synchronize = lambda device=None: None
    # The tied output layer (PP > 1) and fully-parallel checkpoint load move tensors with .cuda().
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # Streams: DDP's grad sync orders its collectives against torch.cuda.current_stream()
    # (megatron-core 0.17+), the MoE alltoall dispatcher and Megatron-LM's get_model create side
    # streams. CPU work is ordered already; torch.cpu's streams have the same methods.
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.stream = torch.cpu.stream

    # The distributed optimizer and clip_grads accept only params whose type() names a CUDA
    # tensor; report CPU float tensors under their CUDA names (only the no-argument query).
    tensor_type = torch.Tensor.type

    def type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = tensor_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if name in _CUDA_TYPE_NAMES else name
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_cuda

    # The RNG tracker (dropout streams, activation recompute) saves and restores the CUDA
    # generator; on CPU the generator that dropout draws from is the CPU one.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.cuda.manual_seed is a silent no-op on CPU builds: without this every TP rank would
    # share one dropout stream instead of seed + 2718 + tp_rank.
    torch.cuda.manual_seed = torch.manual_seed
    # The tracker warns whenever the CPU generator moves inside a fork; on CPU that generator *is*
    # the tracked one, so every dropout would log it.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    # The MoE router's gemm helper is imported from Transformer Engine and referenced without it
    # (megatron-core 0.16: NameError when a router runs; 0.19 sets it to None itself).
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # The alltoall dispatcher copies its split sizes to the host as numpy arrays (what
    # all_to_all_single accepts besides lists); that copy is skipped for tensors already on the
    # CPU, which all_to_all_single then rejects.
    from megatron.core.transformer.moe import token_dispatcher

    def host_copy(tensor, as_numpy=False, record_stream=False):
        return tensor.clone().numpy() if as_numpy and torch.is_tensor(tensor) else tensor

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy

    # torch_dist checkpoint save builds a *spawn* multiprocessing Manager, which re-imports
    # __main__ (seconds per save, and a hang in scripts without a __main__ guard); fork is enough.
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def fork_write_results_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_write_results_queue

    _installed = True


def install_megatron_lm() -> None:
    """install() plus what Megatron-LM's training loop (megatron.training) needs on CPU; used by
    examples/megatron_lm/pretrain_gpt_delta.py when CUDA is unavailable."""
    install()
    from megatron.training import training

    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    torch.cuda.device_count = lambda: 1  # otherwise no model-parallel groups are built
    torch.cuda.set_device = lambda device: None
    try:  # nvcc-built CUDA kernels (core_v0.16.1; core_v0.19.0 has no megatron.legacy)
        from megatron.legacy import fused_kernels
    except ImportError:
        pass
    else:
        fused_kernels.load = lambda args: None
    training.set_jit_fusion_options = lambda *args, **kwargs: None  # the JIT warm-up allocates on "cuda"
