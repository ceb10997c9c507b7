"""Claims: several runs (processes, machines) sharing one output folder split its work and never
clobber each other.

Before a job's image is made, its output is *claimed*: ``OUT/.claims/<hash of the output name>.claim``
is created (under the folder's lock, with ``O_EXCL``) holding the job id, the process id, the host
and the process's start time. Another run that meets a live claim leaves the job to its holder
(the same job) or fails it (another job for the same file: other settings), never writing the file.
A claim is released once the image is written or has failed.

A claim whose holder is dead is stale and taken over: on the same host as soon as its process no
longer exists (or its pid now belongs to a newer process), anywhere when it has not been refreshed
for :data:`STALE_AFTER_S` (gone, suspended or hung) — a holder refreshes its claims at most every
:data:`HEARTBEAT_S` while it works. Temporary files of writes cut short by ``kill -9`` are removed by the next run unless a
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
from collections.abc import Iterable, Iterator
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
_LOCK_NAME = ".lock"
_LOCKS_WORK = True  # False once flock failed here (a filesystem without locks): one warning, then O_EXCL alone
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


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers sharing a hostname have different ones."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Holder:
    """Who holds a claim."""

    job_id: str
    pid: int
    host: str
    start: str | None = None
    ns: str | None = None  # pid namespace

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"

    @classmethod
    def me(cls, job_id: str) -> Holder:
        return cls(job_id, os.getpid(), socket.gethostname(), _start_time(os.getpid()), _pid_namespace())

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname() and self.ns == _pid_namespace()

    def alive(self, age_s: float) -> bool:
        """Is the holder still running? ``age_s``: seconds since the claim was last refreshed. Its pid is
        asked only on the same host, in the same pid namespace, on a system where signal 0 probes."""
        if age_s >= STALE_AFTER_S:  # no heartbeat for that long: gone, suspended or hung
            return False
        if self.host != socket.gethostname() or self.ns != _pid_namespace() or os.name == "nt":
            return True
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
        """Hold the claims lock: ``flock`` on ``.claims/.lock`` (a regular file opened read-write, as
        NFS needs). Where no lock can be taken (Windows, a filesystem without locks) the ``O_EXCL``
        create of each claim decides alone, after one warning."""
        lock = self.dir / _LOCK_NAME
        while True:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                continue  # the folder was removed by a run finishing right now: make it again
            except OSError as e:
                raise StorageError(f"cannot create the claims folder {self.dir}: {e.strerror or e}") from None
            if not self._flock(fd):
                break
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(fd)  # removed (with its folder) while this run waited for it: take the new one
        try:
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _flock(self, fd: int) -> bool:
        global _LOCKS_WORK
        if fcntl is None or not _LOCKS_WORK:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            _LOCKS_WORK = False
            logger.warning("cannot lock %s (%s): claims rely on exclusive creates alone", self.dir, e.strerror or e)
            return False
        return True

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
        except OSError:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            holder = Holder(str(data["job_id"]), int(data["pid"]), str(data["host"]), data.get("start"), data.get("ns"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # being written right now, or cut short
            return Holder(job_id="?", pid=-1, host="?") if age < _UNREADABLE_GRACE_S else None
        if holder.is_me():
            return None  # ours (a claim this process left, e.g. a retried job)
        if holder.alive(age):
            return holder
        logger.info("taking over the stale claim of %s on %s", holder, path)
        return None

    def release(self, output: Path) -> None:
        """Give up the claim of ``output`` — unless another run took it over meanwhile (this run was
        suspended past :data:`STALE_AFTER_S`, say): then it is that run's and stays."""
        path = self.held.pop(Path(output), None)
        if path is None:
            return
        with contextlib.suppress(StorageError), self._locked():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if isinstance(data, dict) and Holder(str(data.get("job_id")), data.get("pid"), str(data.get("host")),
                                                 data.get("start"), data.get("ns")).is_me():  # fmt: skip
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def release_all(self) -> None:
        """Release every claim held, and remove the claims folder once no run holds any."""
        for output in list(self.held):
            self.release(output)
        if not self.dir.is_dir():
            return
        with contextlib.suppress(StorageError), self._locked(), contextlib.suppress(OSError):
            if [p.name for p in self.dir.iterdir()] == [_LOCK_NAME]:
                (self.dir / _LOCK_NAME).unlink()
                self.dir.rmdir()

    def heartbeat(self) -> None:
        """Refresh the claims held (at most every :data:`HEARTBEAT_S`), so other hosts see them live."""
        now = time.monotonic()
        if now - self._beat < HEARTBEAT_S:
            return
        self._beat = now
        for path in self.held.values():
            with contextlib.suppress(OSError):
                os.utime(path)

    def remove_orphan_temps(self, outputs: Iterable[Path]) -> int:
        """Delete temporary files of writes cut short (``kill -9``) next to the planned ``outputs``
        (relative paths): a temp file whose output no live run holds. Other files are never touched."""
        by_folder: dict[Path, set[str]] = {}
        for output in outputs:
            by_folder.setdefault(self.out_dir / Path(output).parent, set()).add(Path(output).name)
        removed = 0
        for folder, names in by_folder.items():
            try:
                entries = [e.name for e in os.scandir(folder)]
            except OSError:
                continue
            for name in entries:
                match = _TMP.match(name)
                if match is None or match["name"] not in names:
                    continue
                output = (folder / match["name"]).relative_to(self.out_dir)
                if self.holder(self.path(output)) is not None:
                    continue  # a live run is writing it right now
                with contextlib.suppress(OSError):
                    (folder / name).unlink()
                    removed += 1
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, self.out_dir)
        return removed
