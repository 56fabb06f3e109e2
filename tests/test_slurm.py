"""slurm/pretrain.sbatch on a real two-node SLURM cluster (tests/slurm/cluster.py: munged, slurmctld and
two slurmd on this machine, installed with apt-get when missing), running the real
`megatron-delta train` on examples/configs/tiny_cpu.yaml, one gloo rank per node.

    test_two_node_training          2 ranks on nodes n1 + n2 (rendezvous at n1's NodeAddr, since "n1"
                                    does not resolve; MEGATRON_DELTA_SETUP sourced on each node): job
                                    exit 0, loss goes down, final checkpoint + resolved config in the run dir
    test_usr1_checkpoints_requeues_and_resumes
                                    `scancel --signal=USR1` (the path of `#SBATCH --signal=USR1@300`)
                                    while the ranks start (ignored) and at step 10: the trainer saves and
                                    exits 143, the job requeues itself, the next run resumes from that
                                    checkpoint and its losses equal the uninterrupted run's at every step
    test_scancel_saves_but_does_not_requeue
                                    plain scancel: checkpoint saved, job stays cancelled
    test_gpu_launch_plan            GPU count from nvidia-smi, NCCL env, pyxis container arguments
                                    (dry run: the srun command printed, nothing started)
    test_missing_config_fails_early bad first argument -> exit 2 with a one-line usage error

Skipped, with the reason, where SLURM cannot be installed or started (not root, no apt-get, daemon
failure). About 3 minutes on 2 cores, nearly all of it the three training jobs.
"""

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.cluster import LocalSlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "slurm" / "pretrain.sbatch"
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
TRAIN_ITERS = 30
SIGNAL_AFTER_STEP = 10
OVERRIDES = [
    f"training.train_iters={TRAIN_ITERS}",
    "training.lr_warmup_iters=5",
    "training.eval_interval=null",  # one evaluation at the end
    "training.eval_iters=1",
    "checkpoint.save_interval=null",  # checkpoints only on exit: the signal's or the final one
    "logging.log_interval=1",
    "logging.tensorboard=false",
]
# Same ranks, same data order, restored optimizer / scheduler / RNG state: a resumed gloo run on CPU
# reproduces the uninterrupted losses up to float32 reduction noise.
LOSS_TOLERANCE = 1e-6  # measured: identical (0.0) at every step
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        # 2 CPUs per node so that the GPU launch plan may put 2 ranks on a node; the training jobs
        # run 1 rank per node, and pretrain.sbatch's jobs are --exclusive, so never side by side.
        local = LocalSlurmCluster(tmp_path_factory.mktemp("slurm-cluster"), cpus_per_node=2)
        local.start()
    except SlurmUnavailable as reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """Where jobs are submitted from (runs/ and data caches land here), with a MEGATRON_DELTA_SETUP
    script that puts this work tree's `megatron-delta` first on each node and says where it ran."""
    root = tmp_path_factory.mktemp("submit")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "megatron-delta"
    cli.write_text(f'#!/bin/sh\nexec {sys.executable} -m megatron_delta.cli "$@"\n')
    cli.chmod(0o755)
    (root / "setup.sh").write_text(
        f'export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} PATH={bin_dir}:$PATH\n'
        'echo "MEGATRON_DELTA_SETUP sourced on $SLURMD_NODENAME by rank $RANK"\n'
    )
    return root


def sbatch_command(*extra: str) -> list[str]:
    return ["sbatch", "--parsable", "--nodes=2", *extra, str(SBATCH), str(CONFIG)] + [
        arg for override in OVERRIDES for arg in ("--set", override)
    ]


def job_env(cluster, submit_dir, run_dir, **extra) -> dict:
    return dict(
        cluster.env, MEGATRON_DELTA_SETUP=str(submit_dir / "setup.sh"), MEGATRON_DELTA_RUN_DIR=str(run_dir), **extra
    )


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; a resumed run appends, and the later line of a step wins."""
    by_step = {}
    metrics = run_dir / "logs" / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    return by_step


def job_report(submit_dir: Path, run_dir: Path) -> str:
    """The batch logs and every rank log, for assertion messages."""
    logs = sorted(submit_dir.glob("*.out")) + sorted(run_dir.glob("slurm-logs/*/rank-*.log"))
    return "\n".join(f"--- {log}\n" + "\n".join(log.read_text().splitlines()[-25:]) for log in logs)


def wait_for(condition, what: str, still_running, report) -> None:
    """Poll `condition` while `still_running()`; on failure the message ends with `report()`."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        assert still_running(), f"job ended before {what}\n{report()}"
        assert time.monotonic() < deadline, f"no {what} after {JOB_TIMEOUT_S} s\n{report()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted_run(cluster, submit_dir):
    run_dir = submit_dir / "runs" / "uninterrupted"
    done = subprocess.run(
        sbatch_command("--wait", f"--output={submit_dir}/uninterrupted-%j.out"),
        cwd=submit_dir, env=job_env(cluster, submit_dir, run_dir),
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    return done, run_dir


def test_two_node_training(uninterrupted_run, submit_dir):
    done, run_dir = uninterrupted_run
    report = job_report(submit_dir, run_dir)
    assert done.returncode == 0, f"sbatch --wait exited {done.returncode}: {done.stderr}\n{report}"
    job_id = done.stdout.split()[0]

    launch = (run_dir / f"slurm-logs/job{job_id}-run0/launch.txt").read_text()
    assert "2 node(s) x 1 process(es), 0 GPU(s) per node, nodes n1 n2" in launch
    assert "MASTER_ADDR=127.0.0.1" in launch  # "n1" does not resolve: scontrol's NodeAddr
    rank_logs = {rank: (run_dir / f"slurm-logs/job{job_id}-run0/rank-{rank}.log").read_text() for rank in (0, 1)}
    assert "MEGATRON_DELTA_SETUP sourced on n1 by rank 0" in rank_logs[0]
    assert "MEGATRON_DELTA_SETUP sourced on n2 by rank 1" in rank_logs[1]

    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, TRAIN_ITERS + 1)), report
    first, last = loss[1], sum(loss[s] for s in range(TRAIN_ITERS - 4, TRAIN_ITERS + 1)) / 5
    assert last < 0.7 * first, f"loss did not go down: step 1 {first:.3f}, last 5 steps {last:.3f}"

    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert checkpoint.name == f"iter_{TRAIN_ITERS:07d}"
    resolved = (checkpoint / "run_config.yaml").read_text()
    assert f"dir: {run_dir}/checkpoints" in resolved and f"dir: {run_dir}/logs" in resolved


def test_usr1_checkpoints_requeues_and_resumes(cluster, submit_dir, uninterrupted_run):
    reference = losses(uninterrupted_run[1])
    assert sorted(reference) == list(range(1, TRAIN_ITERS + 1)), "the uninterrupted run did not finish"
    run_dir = submit_dir / "runs" / "interrupted"
    report = functools.partial(job_report, submit_dir, run_dir)
    job = subprocess.Popen(
        sbatch_command("--wait", f"--output={submit_dir}/interrupted-%j.out"),
        cwd=submit_dir, env=job_env(cluster, submit_dir, run_dir), stdout=subprocess.PIPE, text=True,
    )
    try:
        job_id = job.stdout.readline().strip()
        rank_logs = [run_dir / f"slurm-logs/job{job_id}-run0/rank-{rank}.log" for rank in (0, 1)]
        # A USR1 while the ranks are still starting (setup sourced, trainer importing) must not kill them.
        wait_for(lambda: all(log.exists() and "SETUP sourced" in log.read_text() for log in rank_logs),
                 "both ranks started", lambda: job.poll() is None, report)
        cluster.run("scancel", "--signal=USR1", job_id)
        wait_for(lambda: max(losses(run_dir), default=0) >= SIGNAL_AFTER_STEP, f"step {SIGNAL_AFTER_STEP}",
                 lambda: job.poll() is None, report)
        # To every task of the job's steps, not the batch shell: what `#SBATCH --signal=USR1@300` does.
        cluster.run("scancel", "--signal=USR1", job_id)
        job.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, f"sbatch --wait exited {job.returncode}\n{report()}"

    batch_log = (submit_dir / f"interrupted-{job_id}.out").read_text()
    assert f"trainer ranks exited with 143 (job {job_id} run 0" in batch_log, report()
    assert f"requeueing job {job_id}" in batch_log, report()
    assert f"trainer ranks exited with 0 (job {job_id} run 1" in batch_log, report()
    resumed = re.search(r"resumed from \S+: iteration (\d+)", (run_dir / f"slurm-logs/job{job_id}-run1/rank-0.log").read_text())
    assert resumed, f"run 1 did not resume from a checkpoint\n{report()}"
    resumed_at = int(resumed.group(1))
    assert SIGNAL_AFTER_STEP <= resumed_at < TRAIN_ITERS, f"resumed at iteration {resumed_at}"
    assert (run_dir / "checkpoints" / f"iter_{resumed_at:07d}").is_dir()

    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, TRAIN_ITERS + 1)), report()
    worst = max(range(1, TRAIN_ITERS + 1), key=lambda s: abs(loss[s] - reference[s]))
    assert abs(loss[worst] - reference[worst]) <= LOSS_TOLERANCE, (
        f"step {worst}: resumed-run loss {loss[worst]!r} vs uninterrupted {reference[worst]!r} "
        f"(resumed at iteration {resumed_at})"
    )


def test_scancel_saves_but_does_not_requeue(cluster, submit_dir):
    """scancel (like the time limit and pre-emption) SIGTERMs the ranks and the batch shell: the
    trainer still saves and exits 143, but a cancelled job must stay cancelled."""
    run_dir = submit_dir / "runs" / "cancelled"
    report = functools.partial(job_report, submit_dir, run_dir)
    submitted = subprocess.run(
        sbatch_command(f"--output={submit_dir}/cancelled-%j.out"),
        cwd=submit_dir, env=job_env(cluster, submit_dir, run_dir), capture_output=True, text=True, timeout=60,
    )
    job_id = submitted.stdout.strip()

    def queued():
        return job_id in cluster.job_ids()

    wait_for(lambda: max(losses(run_dir), default=0) >= 3, "step 3", queued, report)
    cluster.run("scancel", job_id)
    # Requeued, the job would stay in the queue (pending, then running); cancelled, it leaves it
    # MinJobAge (5 s) after its processes are gone.
    wait_for(lambda: not queued(), "the job to leave the queue", lambda: True, report)

    assert "requeueing" not in (submit_dir / f"cancelled-{job_id}.out").read_text(), report()
    assert not (run_dir / f"slurm-logs/job{job_id}-run1").exists(), report()
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert 3 <= int(saved.removeprefix("iter_")) < TRAIN_ITERS, f"checkpoint {saved}\n{report()}"


def test_gpu_launch_plan(cluster, submit_dir, tmp_path):
    """Two nodes with 2 GPUs each (a fake nvidia-smi), in a pyxis container, dry run."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    run_dir = tmp_path / "run"
    env = job_env(
        cluster, submit_dir, run_dir, PATH=f"{fake_bin}:{os.environ['PATH']}", MEGATRON_DELTA_DRY_RUN="1",
        MEGATRON_DELTA_CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3", MEGATRON_DELTA_CONTAINER_MOUNTS="/data:/data",
    )
    done = subprocess.run(
        sbatch_command("--wait", f"--output={tmp_path}/%j.out"), cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60
    )
    plan = next(tmp_path.glob("*.out")).read_text()
    assert done.returncode == 0, plan
    assert "2 node(s) x 2 process(es), 2 GPU(s) per node" in plan
    for line in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_IB_SL=1", "NCCL_IB_TIMEOUT=19", "OMP_NUM_THREADS=1"):
        assert line in plan.splitlines(), f"{line} missing from\n{plan}"
    srun = shlex.split(next(line for line in plan.splitlines() if line.startswith("srun ")))
    for arg in (
        "--nodes=2", "--ntasks-per-node=2", "--ntasks=4", "--cpus-per-task=1",
        "--container-image=nvcr.io/nvidia/pytorch:25.01-py3",
        f"--container-mounts={submit_dir}:{submit_dir},{run_dir}:{run_dir},/data:/data",
        f"checkpoint.dir={run_dir}/checkpoints", f"logging.dir={run_dir}/logs",
    ):
        assert arg in srun, f"{arg} missing from {srun}"
    assert srun[-2:] == ["--resume", "auto"]
    assert not run_dir.exists(), "a dry run must not create the run dir"


def test_missing_config_fails_early(cluster, tmp_path):
    done = subprocess.run(
        ["sbatch", "--wait", f"--output={tmp_path}/%j.out", str(SBATCH), "no/such.yaml"],
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "first argument must be a config file, got 'no/such.yaml'" in next(tmp_path.glob("*.out")).read_text()
