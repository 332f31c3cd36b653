"""One run per output_dir: rank 0 holds an exclusive lock on ``OUTPUT_DIR/.fleetlm.lock`` while it runs.

Two runs writing one output_dir replace each other's checkpoints and interleave metrics.jsonl. The
lock is ``flock`` on an open file, so the kernel releases it when the process ends in any way,
SIGKILL included. A lock file left behind therefore does not block a later run. The file records
the holder's process id, host and start time for the message another run prints.
NOTE: flock covers the processes of one machine. A file system that does not support it (some NFS
setups) gets a warning and no lock.
"""

import datetime
import fcntl
import os
import socket
import stat
from typing import Optional

from fleetlm.arguments import ConfigError
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".fleetlm.lock"


class OutputDirLock:
    """An exclusive lock on one output_dir, held from ``acquire`` until ``release`` or the end of the process."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the run that holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            # O_NOFOLLOW: a symbolic link planted at the lock path must not make the run overwrite its target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise self._unusable(e.strerror or str(e)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._unusable("not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that wrote no details"
            os.close(fd)
            raise ConfigError(
                f"output_dir='{os.path.dirname(self.path)}' is in use by another run ({holder}); two runs in one "
                "output_dir overwrite each other's checkpoints. Wait for that run to end or stop it, or choose "
                "another output_dir."
            ) from None
        except OSError as e:
            os.close(fd)
            logger.warning("cannot lock %s (%s); nothing stops a second run from writing into this output_dir",
                           self.path, e.strerror)
            return
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise self._unusable(e.strerror or str(e)) from None
        self._fd = fd

    def _unusable(self, reason: str) -> ConfigError:
        return ConfigError(
            f"cannot use the lock file {self.path} ({reason}); it keeps two runs out of one output_dir. Remove it "
            "(no running fleetlm run holds a file in this state) or choose another output_dir."
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
