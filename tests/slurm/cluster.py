"""A real two-node SLURM cluster on one machine, for tests of slurm/pretrain.sbatch.

    with LocalSlurmCluster(tmp_dir) as cluster:      # raises SlurmUnavailable if it cannot start
        subprocess.run(["sbatch", "--wait", ...], env=cluster.env)

It runs Debian's SLURM (installed with apt-get when missing, which needs root): one munged, one
slurmctld and two slurmd (nodes n1, n2 on NodeAddr 127.0.0.1 with `cpus_per_node` CPUs each; nothing
enforces them without cgroups, so keep jobs small), all in the foreground as children of this process, with every
file (config, munge key and socket, spool, state, logs) under the given directory. Nothing on the
machine is touched besides the package install: munged gets its own socket and key, SLURM finds it
through AuthInfo, and clients find the cluster through SLURM_CONF (set in `cluster.env`).

Stopping cancels every job still queued or running, waits for the jobs' processes to go, then
stops the daemons this object started. Facts behind the settings: /work/shared/reference/slurm-local.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def ensure_slurm_installed() -> None:
    """Install SLURM and munge from the distribution's packages when any daemon is missing."""
    if all(map(_program, PROGRAMS)):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str | None:
    """The path of a SLURM / munge program; daemons live in /usr/sbin, often not on a user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


class LocalSlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to launch jobs (run the tests as root)")
        ensure_slurm_installed()
        try:
            self._start_munged()
            self._write_slurm_conf()
            self._spawn("slurmctld", [_program("slurmctld"), "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", [_program("slurmd"), "-D", "-f", str(self.conf), "-N", node])
            self._wait_until(self._all_nodes_idle, 60, "both nodes idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons in reverse start order (also after a failed start)."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._daemons):
            self._cancel_all_jobs()
        for name, process in reversed(self._daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._daemons.clear()

    # -- client helpers --------------------------------------------------------------------

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, scontrol, scancel, squeue) against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()}")
        return done

    def job_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%A").stdout.split()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of every daemon log, for failure messages."""
        tails = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._daemons.append((name, process))
        time.sleep(0.2)
        if process.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with code {process.returncode} at start:\n{self.log_tail()}")

    def _start_munged(self) -> None:
        # munged checks that its key and directories are private to the user it runs as.
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                _program("munged"), "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={self.root / 'munged-internal.log'}",
            ],
        )
        self._wait_until(self.munge_socket.exists, 10, "munged socket")

    def _write_slurm_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        state = self.root / "state"
        state.mkdir(exist_ok=True)
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for node in NODES
        )
        self.conf.write_text(
            f"""\
ClusterName=megatron-delta-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={state}
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld-internal.log
SlurmdLogFile={self.root}/slurmd-%n-internal.log
# No cgroups on CI machines: track processes by parentage, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Poll often so that test jobs start and report quickly (MinJobAge: `sbatch --wait` polls every 2 s).
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=5
KillWait=10
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _all_nodes_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False)
        return done.returncode == 0 and sorted(set(done.stdout.split())) == sorted(NODES)

    def _cancel_all_jobs(self) -> None:
        try:
            for job in self.job_ids():
                self.run("scancel", job, check=False)
            # KillWait (10 s) after SIGTERM the job's processes get SIGKILL; then the job leaves squeue.
            self._wait_until(lambda: not self.job_ids(), 40, "all jobs gone after scancel")
        except (RuntimeError, subprocess.TimeoutExpired, SlurmUnavailable) as error:
            print(f"LocalSlurmCluster.stop: {error}")

    def _wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self._daemons:
                if process.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {timeout} s waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.25)
