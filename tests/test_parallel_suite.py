"""Multi-rank runs over gloo, launched as real torchrun sessions.

The mesh suite (tests/parallel) runs in ONE 4-rank session instead of a process per test:
importing torch + Megatron costs ~10 s per launch.
"""

from launcher import torchrun


# About 270 s on an idle 2-core machine (4 ranks share 2 cores); a CI host under load took over 420 s.
# The limit only has to stop a hung collective well inside CI's time.
SUITE_TIMEOUT_S = 1500


def test_parallel_suite_passes_on_four_ranks():
    result = torchrun(4, "-m", "pytest", "tests/parallel", "-q", "-p", "no:cacheprovider", timeout=SUITE_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]


def test_parity_command_prints_table_and_exits_nonzero_past_tolerance():
    # TP2 rounding (~1e-7 relative) exceeds an impossible tolerance: FAIL, exit status 1.
    # (The passing path is the mesh suite above.) An MoE model with its experts split over the
    # two ranks (EP2, expert TP1; SP implied by TP2 x EP2).
    result = torchrun(2, "examples/parity_check.py", "--tp", "2", "--ep", "2", "--etp", "1", "--num-experts", "4",
                       "--moe-topk", "3", "--dispatcher", "alltoall", "--variant", "delta_block",
                       "--steps", "2", "--tolerance", "1e-12")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-6000:]
    assert "experts=4 top3 alltoall" in result.stdout
    assert "TP2 PP1 DP1 EP2 ETP1 SP" in result.stdout and "FAIL: 2 iteration(s)" in result.stdout
