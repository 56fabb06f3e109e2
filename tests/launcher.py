"""How tests start other processes: one place for torchrun sessions and CLI runs.

Every launch gets one intra-op thread, the megatron_delta under test (this checkout, not another
installed copy) and a hard timeout that kills the whole process tree, so a hung collective or a
stuck rank cannot hang `pytest tests`.
"""

import os
import socket
import subprocess
import sys

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def env(**extra: str) -> dict:
    """The environment of a launched process: one thread, this checkout first on the path."""
    path = os.pathsep.join([REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, *args: str) -> list:
    """`torchrun --nproc_per_node=nproc ARGS` on a free port (tests may run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def cli_command(*args: str) -> list:
    return [sys.executable, "-m", "megatron_delta.cli", *args]


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a launched process and everything it started: torchrun puts its workers in sessions
    of their own, which killing torchrun's process group would leave running."""
    try:
        root = psutil.Process(process.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:  # already gone
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def start(command: list, cwd: str = REPO, extra_env: dict | None = None) -> subprocess.Popen:
    """A background process (stdout and stderr together); the caller ends it with kill_tree."""
    return subprocess.Popen(command, cwd=cwd, env=env(**(extra_env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(command: list, timeout: float = TIMEOUT_S, cwd: str = REPO, extra_env: dict | None = None,
        merge_output: bool = False) -> subprocess.CompletedProcess:
    """Run to completion; past `timeout` seconds the whole tree is killed and the test fails with
    the end of its output."""
    process = subprocess.Popen(command, cwd=cwd, env=env(**(extra_env or {})), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s:\n"
                             f"{stdout[-3000:]}{(stderr or '')[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr or "")


def torchrun(nproc: int, *args: str, timeout: float = TIMEOUT_S, cwd: str = REPO, extra_env: dict | None = None,
             merge_output: bool = False) -> subprocess.CompletedProcess:
    return run(torchrun_command(nproc, *args), timeout, cwd, extra_env, merge_output)
