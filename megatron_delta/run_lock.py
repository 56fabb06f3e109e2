"""One training run per run directory (logging.dir).

Two runs writing the same directory overwrite each other's checkpoints and interleave their
metrics.jsonl. The first run's rank 0 holds an exclusive fcntl.flock on <logging.dir>/.run.lock
for its whole life; a second run fails at once naming the holder. The kernel drops the lock when
the holder dies (also by SIGKILL), so it is never stale; the pid and host written into the file
are only for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys

LOCK_FILE = ".run.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunDirectoryLock:
    def __init__(self, directory: str):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise OSError(f"logging.dir={directory!r} cannot be the run directory: {e.strerror}") from None
        self.path = os.path.join(directory, LOCK_FILE)
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                # Some parallel file systems are mounted without lock support.
                print(f"warning: cannot lock {self.path} ({e.strerror}): nothing stops a second run from "
                      f"writing into {directory}", file=sys.stderr)
                return
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunDirectoryBusy(
                f"logging.dir={directory!r} is in use by {holder} (lock {self.path}); wait for that run to end, "
                f"or give this one another logging.dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing drops the lock
