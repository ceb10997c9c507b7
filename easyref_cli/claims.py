"""Claims: several runs (processes, machines) sharing one output folder split its work and never
clobber each other.

Before a job's image is made, its output is *claimed*: ``OUT/.claims/<hash of the output name>.claim``
is created (under the folder's lock, with ``O_EXCL``) holding the job id, the process id, the host
and the process's start time. Another run that meets a live claim leaves the job to its holder
(the same job) or fails it (another job for the same file: other settings), never writing the file.
A claim is released once the image is written or has failed.

A claim whose holder is dead is stale and taken over: on the same host when its process no longer
exists (or its pid now belongs to a newer process), on another host when it has not been refreshed
for :data:`STALE_AFTER_S` — a holder refreshes its claims at most every :data:`HEARTBEAT_S` while
it works. Temporary files of writes cut short by ``kill -9`` are removed by the next run unless a
live run holds their output.

Torch-free. Locks are ``fcntl.flock`` (local disks, NFSv4 and most cluster filesystems); where
``fcntl`` does not exist (Windows) the ``O_EXCL`` create alone decides.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from easyref_cli.errors import StorageError

logger = logging.getLogger(__name__)

CLAIMS_DIR = ".claims"
#: A claim from another host that has not been refreshed for this long is stale.
STALE_AFTER_S = 30 * 60
#: How often a run refreshes the claims it holds (from the denoising loop's step callback).
HEARTBEAT_S = 60
#: A claim file that is still empty or unreadable after this long was cut short: stale.
_UNREADABLE_GRACE_S = 10
_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")  # files.write_bytes_atomic's temp names

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _start_time(pid: int) -> str | None:
    """The process's start time since boot (Linux ``/proc``), to tell a reused pid; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the (command)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a claim."""

    job_id: str
    pid: int
    host: str
    start: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"

    @classmethod
    def me(cls, job_id: str) -> Holder:
        return cls(job_id, os.getpid(), socket.gethostname(), _start_time(os.getpid()))

    def alive(self, age_s: float) -> bool:
        """Is the holder still running? ``age_s``: seconds since the claim was last refreshed."""
        if self.host != socket.gethostname():
            return age_s < STALE_AFTER_S
        if not _pid_alive(self.pid):
            return False
        return self.start is None or _start_time(self.pid) in (None, self.start)


class Claims:
    """The claims one run holds in ``out_dir``. Use as a context manager: leaving releases them all."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / CLAIMS_DIR
        self.held: dict[Path, Path] = {}  # output (relative) → claim file
        self._beat = time.monotonic()

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()

    def path(self, output: Path) -> Path:
        digest = hashlib.sha256(Path(output).as_posix().encode("utf-8")).hexdigest()[:32]
        return self.dir / f"{digest}.claim"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the claims folder's lock (a ``flock`` on the folder itself, so it leaves no file)."""
        while True:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.dir, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed by a run finishing right now: make it again
            except OSError as e:
                raise StorageError(f"cannot create the claims folder {self.dir}: {e.strerror or e}") from None
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                break
            os.close(fd)  # it was removed while this run waited for its lock
        try:
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def acquire(self, job_id: str, output: Path) -> Holder | None:
        """Claim ``output`` for ``job_id``: ``None`` once it is ours, else the live holder of the claim.

        Raises:
            StorageError: the claim cannot be written (read-only or full output folder).
        """
        path = self.path(output)
        with self._locked():
            holder = self.holder(path)
            if holder is not None:
                return holder
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its holder is gone
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:  # a run without the lock (another platform) was faster
                return self.holder(path) or Holder(job_id="?", pid=-1, host="?")
            except OSError as e:
                raise StorageError(f"cannot claim {self.out_dir / output} in {self.dir}: {e.strerror or e}") from None
            me = Holder.me(job_id)
            try:
                os.write(fd, json.dumps({**me.__dict__, "output": Path(output).as_posix()}).encode("utf-8"))
            except OSError as e:
                os.close(fd)
                os.unlink(path)
                raise StorageError(f"cannot claim {self.out_dir / output} in {self.dir}: {e.strerror or e}") from None
            os.close(fd)
        self.held[Path(output)] = path
        return None

    def holder(self, path: Path) -> Holder | None:
        """The live holder of the claim file ``path``; None when there is none or it is stale."""
        try:
            age = time.time() - path.stat().st_mtime
            data = json.loads(path.read_text(encoding="utf-8"))
            holder = Holder(str(data["job_id"]), int(data["pid"]), str(data["host"]), data.get("start"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # being written right now, or cut short
            return Holder(job_id="?", pid=-1, host="?") if age < _UNREADABLE_GRACE_S else None
        if holder.pid == os.getpid() and holder.host == socket.gethostname():
            return None  # ours (a claim this process left, e.g. a retried job)
        if holder.alive(age):
            return holder
        logger.info("taking over the stale claim of %s on %s", holder, path)
        return None

    def release(self, output: Path) -> None:
        path = self.held.pop(Path(output), None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def release_all(self) -> None:
        """Release every claim held, and remove the claims folder once no run holds any."""
        for output in list(self.held):
            self.release(output)
        if not self.dir.is_dir():
            return
        with contextlib.suppress(StorageError), self._locked(), contextlib.suppress(OSError):
            self.dir.rmdir()  # fails while other runs' claims are in it

    def heartbeat(self) -> None:
        """Refresh the claims held (at most every :data:`HEARTBEAT_S`), so other hosts see them live."""
        now = time.monotonic()
        if now - self._beat < HEARTBEAT_S:
            return
        self._beat = now
        for path in self.held.values():
            with contextlib.suppress(OSError):
                os.utime(path)

    def remove_orphan_temps(self) -> int:
        """Delete temporary files of writes cut short (``kill -9``) whose output no live run holds."""
        removed = 0
        if not self.out_dir.is_dir():
            return 0
        for root, dirs, names in os.walk(self.out_dir):
            dirs[:] = [d for d in dirs if d != CLAIMS_DIR]
            for name in names:
                match = _TMP.match(name)
                if match is None:
                    continue
                tmp = Path(root) / name
                output = tmp.with_name(match["name"]).relative_to(self.out_dir)
                if self.holder(self.path(output)) is not None:
                    continue  # a live run is writing it right now
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed += 1
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, self.out_dir)
        return removed
