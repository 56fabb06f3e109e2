"""Every mesh computes what one process computes: loss and every gradient (after finalize_model_grads)
agree with a TP=1/PP=1 reference to 1e-5 relative in fp32 (observed: <= 1e-6).

Runs on 4 ranks; data parallelism fills the ranks a layout leaves free (TP2 -> DP2, PP4 -> DP1).
Every assertion is on a report all ranks share, so all ranks pass or fail together.
"""

import pytest
import torch

from megatron_delta import parity, pipeline_seq_length
from megatron_delta.mesh import destroy_model_parallel, init_model_parallel, set_seeds
from megatron_delta.parity import Mesh, Problem, run_parity

# Variants under the mesh suite; add a variant here to put it under every mesh below.
VARIANTS = ["standard", "delta", "delta_block", "attnres_block", "attnres_full"]

MESHES = {
    "tp2": Mesh(tp=2),
    "tp2_sp": Mesh(tp=2, sp=True),
    "pp2": Mesh(pp=2),
    "pp4": Mesh(pp=4),
    "pp2_vpp2": Mesh(pp=2, vpp=2),
    "tp2_pp2": Mesh(tp=2, pp=2),
    "dp4_dist_opt": Mesh(dist_opt=True),
    "tp2_recompute_full": Mesh(tp=2, recompute="full"),
    "pp2_recompute_selective": Mesh(pp=2, recompute="selective"),
    # Interleaved rings where ranks keep sources for their later chunks: every source crosses 3
    # hops (PP4), and a middle chunk both reads kept sources and keeps them (VPP3), recomputed.
    "pp4_vpp2": Mesh(pp=4, vpp=2),
    "pp2_vpp3_recompute_full": Mesh(pp=2, vpp=3, recompute="full"),
}
# One layer per model chunk: layers = pp x vpp where that exceeds the default 4.
LAYERS = {"pp4_vpp2": 8, "pp2_vpp3_recompute_full": 6}
# The Kimi baselines skip only the pure data-parallel layout (their routing code is the same as
# delta's there), to keep the 4-rank session short; delta and delta_block run on every mesh.
CASES = [
    pytest.param(mesh, Problem(variant=variant, layers=LAYERS.get(name, 4)), id=f"{name}-{variant}")
    for variant in VARIANTS
    for name, mesh in MESHES.items()
    if not (variant.startswith("attnres") and name == "dp4_dist_opt")
]

# Mixture-of-experts GPT (4 experts, top-2, every layer MoE; the compared loss includes the
# load-balancing loss): expert parallelism alone, with TP + SP (expert TP 1 and 2), with PP
# (MoE layers on both stages) and interleaved PP, with the distributed optimizer (DP4 x EP2: the
# expert grads reduce-scatter over expert-DP 2), on both CPU-capable token dispatchers.
MOE_MESHES = {
    "ep2": (Mesh(ep=2), "allgather"),
    "ep2_alltoall": (Mesh(ep=2), "alltoall"),
    "tp2_sp_ep2_etp1": (Mesh(tp=2, sp=True, ep=2, etp=1), "alltoall"),
    "tp2_sp_ep2_etp2": (Mesh(tp=2, sp=True, ep=2, etp=2), "allgather"),
    "pp2_ep2": (Mesh(pp=2, ep=2), "alltoall"),
    "pp2_vpp2_ep2": (Mesh(pp=2, vpp=2, ep=2), "allgather"),
    "ep2_dist_opt": (Mesh(ep=2, dist_opt=True), "alltoall"),
}
# The Kimi baselines on EP and PP; delta and delta_block on every MoE mesh.
MOE_CASES = [
    pytest.param(mesh, Problem(variant=variant, num_experts=4, dispatcher=dispatcher), id=f"moe_{name}-{variant}")
    for variant in ["delta", "delta_block", "attnres_block", "attnres_full"]
    for name, (mesh, dispatcher) in MOE_MESHES.items()
    if not variant.startswith("attnres") or name in ("ep2", "pp2_ep2")
]

# Multi-token prediction (one MTP layer, Megatron's, on the last pipeline stage, which then holds
# its own copy of the embedding; under SP its norms are the local backend's): the compared loss
# includes the weighted MTP loss.
MTP_CASES = [
    pytest.param(Mesh(pp=2), Problem(variant="delta", mtp=1), id="mtp_pp2-delta"),
    pytest.param(Mesh(tp=2, sp=True), Problem(variant="delta_block", mtp=1), id="mtp_tp2_sp-delta_block"),
    pytest.param(Mesh(pp=2, vpp=2), Problem(variant="delta_block", mtp=1), id="mtp_pp2_vpp2-delta_block"),
]


def _assert_parity(report):
    assert report.passed, "\n" + report.table()
    # A mesh that silently skipped parameters would also "pass": every reference param is compared.
    assert len(report.grad_errors) > 0 and not report.failures


@pytest.mark.parametrize("mesh, problem", CASES + MOE_CASES + MTP_CASES)
def test_mesh_matches_one_process(mesh, problem):
    _assert_parity(run_parity(mesh, problem))


@pytest.mark.parametrize("variant", ["standard", "delta_block"])
def test_optimizer_steps_match_with_distributed_optimizer(variant):
    """Three iterations with two Adam steps in between (Megatron's distributed optimizer on
    TP2 x DP2 x SP): losses of every iteration and the last gradients still agree."""
    report = run_parity(Mesh(tp=2, sp=True, dist_opt=True), Problem(variant=variant, steps=3))
    _assert_parity(report)
    assert report.losses_ref[2] < report.losses_ref[0]  # the steps really moved the weights


def test_check_detects_swapped_pipeline_messages(monkeypatch):
    """The comparison is sensitive: with batched p2p on gloo, PP2 x VPP2 swaps activation and
    gradient messages of one shape; the check must fail (loss off ~1e-3, grads off by O(1))."""
    make_config = parity._transformer_config

    def batched_p2p_config(problem, mesh):
        config = make_config(problem, mesh)
        config.batch_p2p_comm = True
        return config

    monkeypatch.setattr(parity, "_transformer_config", batched_p2p_config)
    report = run_parity(Mesh(pp=2, vpp=2), Problem())
    assert not report.failures
    assert report.loss_rel_error > 1e-4 and report.max_grad_rel_error > 1e-2, report.table()


def test_interleaved_chunks_that_were_not_linked_are_a_clear_error():
    """A rank's later model chunk reads the sources its earlier chunk kept; built without
    link_virtual_stages it says so instead of failing inside the schedule."""
    problem, mesh = Problem(variant="delta_block"), Mesh(pp=2, vpp=2)
    init_model_parallel(mesh.tp, mesh.pp, mesh.vpp)
    set_seeds(problem.seed)
    try:
        config = parity._transformer_config(problem, mesh)
        # Both chunks: building them all-reduces the tied embedding between the first and last.
        chunk = [parity._build_chunk(problem, config, vp_stage) for vp_stage in (0, 1)][1]
        chunk.set_input_tensor(torch.zeros(pipeline_seq_length(chunk.delta, config, problem.seq),
                                           problem.micro_batch, problem.hidden))
        tokens = torch.zeros(problem.micro_batch, problem.seq, dtype=torch.long)
        with pytest.raises(RuntimeError, match=r"call megatron_delta.link_virtual_stages\(model_chunks\)"):
            chunk(tokens, torch.arange(problem.seq).expand(problem.micro_batch, -1), None)
    finally:
        destroy_model_parallel()
