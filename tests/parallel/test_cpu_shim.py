"""The CPU shim under a real 4-rank gloo world."""

import pytest
import torch

from megatron_delta import cpu_shim


def test_tensor_parallel_ranks_draw_distinct_dropout_streams():
    """torch.cuda.manual_seed is a no-op on CPU builds; routed to the CPU generator, the
    model-parallel RNG stream differs across TP ranks while the default stream agrees."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_delta.mesh import destroy_model_parallel, init_model_parallel

    init_model_parallel(tp=2)
    try:
        torch.manual_seed(7)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(8)
        default = torch.rand(8)
        tracked_all = [torch.empty(8) for _ in range(4)]
        default_all = [torch.empty(8) for _ in range(4)]
        torch.distributed.all_gather(tracked_all, tracked)
        torch.distributed.all_gather(default_all, default)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    finally:
        destroy_model_parallel()
    # Ranks 0,1 form one TP group and 2,3 the other: TP rank r gets seed 7 + 2718 + r.
    assert not torch.equal(tracked_all[0], tracked_all[1])
    assert torch.equal(tracked_all[0], tracked_all[2]) and torch.equal(tracked_all[1], tracked_all[3])
    assert all(torch.equal(default_all[0], other) for other in default_all[1:])
    assert tp_rank == torch.distributed.get_rank() % 2


def test_install_is_idempotent_and_reports_cuda_tensor_types():
    zeros = torch.zeros
    cpu_shim.install()
    assert torch.zeros is zeros  # a second install wraps nothing twice
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.nn.Parameter(torch.zeros(2)).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64
    # DDP's grad sync (megatron-core 0.17+) and the MoE dispatcher order work on CUDA streams.
    side = torch.cuda.Stream()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.stream(side):
        assert torch.ones(1, device="cuda").item() == 1.0


def test_install_refuses_gpu_machines(monkeypatch):
    monkeypatch.setattr(cpu_shim, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_shim.install()
