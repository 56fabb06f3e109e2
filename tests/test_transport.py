"""Pipeline transport: what crosses each hop of the pipeline ring, and the way back of the gradients
of the sources a rank keeps for its next model chunk (interleaved pipelines).

The model-level proof is the 4-rank mesh suite (tests/parallel: PP2 x VPP2, PP4 x VPP2 and
PP2 x VPP3 with full recompute give the one-process loss and gradients); here the transport's
bookkeeping is checked on its own: by replaying the ring, and on small autograd graphs.
"""

import types

import pytest
import torch

from megatron_delta import DeltaResidualConfig, boundary_bytes, pipeline_seq_length
from megatron_delta.transport import KeptSources, SourceCache, boundaries


def layout(pp, vpp, num_layers, tp=1, sp=False, hidden=4096):
    """The TransformerConfig fields the transport reads."""
    return types.SimpleNamespace(
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp, num_layers=num_layers,
        tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=1, hidden_size=hidden,
        pipeline_dtype=torch.bfloat16, params_dtype=torch.bfloat16,
    )


LAYOUTS = [  # (variant, num_blocks, pp, vpp, num_layers)
    ("delta_block", 4, 4, 3, 36),
    ("delta_block", 2, 2, 2, 4),
    ("delta_block", 8, 2, 4, 48),
    ("delta", 1, 4, 2, 8),
    ("delta", 1, 2, 3, 6),
    ("attnres_block", 3, 3, 2, 12),
    ("attnres_full", 1, 2, 2, 4),
    ("delta_block", 4, 4, None, 36),  # plain 1F1B: nothing to keep
]


@pytest.mark.parametrize("variant, num_blocks, pp, vpp, num_layers", LAYOUTS)
def test_each_source_crosses_each_hop_once_and_every_chunk_has_all_it_routes_over(
        variant, num_blocks, pp, vpp, num_layers):
    """Replay the ring: chunk c runs on rank c % pp with what that rank holds (everything that
    existed when its previous chunk ended) plus the message. No message carries a source its
    receiver holds, and the chunk starts with every source of its state."""
    delta = DeltaResidualConfig(variant=variant, num_blocks=num_blocks)
    bounds = boundaries(delta, layout(pp, vpp, num_layers))
    held = {rank: set() for rank in range(pp)}
    hops_crossed = {}  # source index -> hops it crossed
    for b in bounds:
        sender, receiver = (b.chunk - 1) % pp, b.chunk % pp
        kept, message = set(range(b.kept)), set(range(b.kept, b.layout.num_sources))
        assert kept <= held[receiver] and not message & held[receiver]
        for source in message:
            assert (sender, receiver) not in hops_crossed.setdefault(source, set())
            hops_crossed[source].add((sender, receiver))
        assert kept | message == set(range(b.layout.num_sources))
        # Sender's chunk ended with these sources: its rank holds them for its next chunk.
        held[sender] = set(range(b.layout.num_sources))
    if vpp:  # a source visits every other rank once and never comes back to its maker
        assert max(len(hops) for hops in hops_crossed.values()) == pp - 1


def test_interleaved_7p6b_delta_block_sends_half_of_re_sending_every_source():
    """7.6B delta_block (36 layers, 4 blocks), TP2 + SP, PP4 x VPP3, seq 2048, micro-batch 1, bf16:
    a slot is 2048 / 2 x 4096 x 2 B = 8 MiB. Chunks of 3 layers, blocks of 9: the state entering
    chunk c (layer 3c) is x, the open partial (3c % 9 != 0), x_0 and the 3c // 9 block deltas, up
    to 6 tensors; what crosses is x, the partial and the block deltas the receiving rank has not
    seen (it ran chunk c - 4), at most 3."""
    delta = DeltaResidualConfig(variant="delta_block", num_blocks=4)
    config = layout(4, 3, 36, tp=2, sp=True)
    sent = boundary_bytes(delta, config, 2048, 1)
    assert [b["state_tensors"] for b in sent] == [3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6]
    assert [b["tensors"] for b in sent] == [3, 3, 3, 3, 3, 2, 3, 3, 2, 3, 3]
    assert {b["sent_bytes"] for b in sent} == {3 * 8 * 2**20}
    assert pipeline_seq_length(delta, config, 2048) == 3 * 2048


def test_interleaved_delta_sends_the_sources_of_the_last_pp_minus_1_chunks_only():
    """delta (a source per sublayer), 36 layers, PP4 x VPP3: 3 layers = 6 sources per chunk. The
    state entering the last chunk holds x and 1 + 66 sources; what crosses is x plus the sources
    of the 3 chunks the receiver has not run since: 1 + 18 (+ x_0 in the first round: 20)."""
    delta = DeltaResidualConfig(variant="delta")
    sent = boundary_bytes(delta, layout(4, 3, 36), 2048, 1)
    assert max(b["state_tensors"] for b in sent) == 68
    assert [b["tensors"] for b in sent] == [8, 14, 20] + [19] * 8


def test_kept_source_gradients_come_back_through_the_earlier_chunk():
    """Three chunks as the interleaved schedule runs them on two ranks: A (rank 0) makes s and keeps
    it, B (rank 1), C (rank 0 again) reads the kept s. Each chunk's backward runs on its own graph,
    last chunk first, and x gets the gradient of the whole computation in one graph."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def one_graph(x):
        s = x.sin()
        a_out = s * 3
        b_out = a_out.exp()
        return (b_out * s).sum() + s.pow(2).sum()

    expected = torch.autograd.grad(one_graph(x), x)[0]

    cache, kept = SourceCache(), KeptSources()
    (s,) = kept.add([x.sin()])  # chunk A
    cache.put(1, kept)
    a_out = s * 3
    a_received = a_out.detach().requires_grad_()  # chunk B, on the next rank
    b_out = a_received.exp()
    b_received = b_out.detach().requires_grad_()  # chunk C reads s from its rank
    (s_kept,) = cache.take(1).read()
    loss = (b_received * s_kept).sum() + s_kept.pow(2).sum()

    loss.backward()  # C
    torch.autograd.backward(b_out, b_received.grad)  # B
    torch.autograd.backward(a_out, a_received.grad)  # A: adds what C left for s
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_backward_out_of_order_or_unread_kept_sources_are_clear_errors():
    x = torch.randn(3, requires_grad=True)
    kept = KeptSources()
    (s,) = kept.add([x * 2])
    with pytest.raises(RuntimeError, match="never read the sources kept for it"):
        s.sum().backward(retain_graph=True)
    kept.read()
    with pytest.raises(RuntimeError, match="ran before the backward of the rank's next chunk"):
        s.sum().backward()
    with pytest.raises(RuntimeError, match="virtual stage 2 ran a micro-batch that virtual stage 1"):
        SourceCache().take(2)
