"""Multi-rank runs over gloo, launched as real torchrun sessions.

The mesh suite (tests/parallel) runs in ONE 4-rank session instead of a process per test:
importing torch + Megatron costs ~10 s per launch. Every launch has a hard timeout that kills
its whole process group, so a hung collective cannot hang `pytest tests`.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 420
REPO = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # own process group: the timeout kills torchrun and every rank
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(args)} did not finish in {TIMEOUT_S} s:\n{stdout[-3000:]}{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_parallel_suite_passes_on_four_ranks():
    result = _torchrun(4, "-m", "pytest", "tests/parallel", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]


def test_parity_command_prints_table_and_exits_nonzero_past_tolerance():
    # TP2 rounding (~1e-7 relative) exceeds an impossible tolerance: FAIL, exit status 1.
    # (The passing path is the mesh suite above.) An MoE model with its experts split over the
    # two ranks (EP2, expert TP1; SP implied by TP2 x EP2).
    result = _torchrun(2, "examples/parity_check.py", "--tp", "2", "--ep", "2", "--etp", "1", "--num-experts", "4",
                       "--moe-topk", "3", "--dispatcher", "alltoall", "--variant", "delta_block",
                       "--steps", "2", "--tolerance", "1e-12")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-6000:]
    assert "experts=4 top3 alltoall" in result.stdout
    assert "TP2 PP1 DP1 EP2 ETP1 SP" in result.stdout and "FAIL: 2 iteration(s)" in result.stdout
