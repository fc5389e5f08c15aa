"""A source agent's live snapshots: one guest's RAM and state into its --snapshot-dir.

The agent creates FILE (new, exclusively, never through a symlink, relative
to the directory's fd: the rules of migrate.backing) sized to the guest's
RAM and hands an fd on it to the guest's runner, which write-protects its
RAM at one instant and saves it from native threads while the guest runs
(migrate.guest.snapshot). A watcher thread here polls the runner's
counters; once every page is saved it writes FILE.state.json (the state at
the write-protect instant, migrate.snapshot_image), and the snapshot is
complete. A snapshot that fails leaves no file behind.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from migrate import errors
from migrate.backing import BackingDir, file_name
from migrate.guests import HostedGuest
from migrate.names import Phase
from migrate.proto import migrate_pb2 as pb
from migrate.snapshot_image import STATE_SUFFIX, state_doc

log = logging.getLogger(__name__)

#: Seconds between two looks at the runner's counters.
POLL_EVERY = 0.05
#: Finished snapshots whose status an agent still answers.
KEEP_FINISHED = 64
#: Seconds of the guest's progress before the snapshot its pace is measured over.
PACE_WINDOW_S = 1.0


def snapshot_name(file: str) -> str:
    """FILE, checked: it and FILE.state.json must both be plain names in the directory."""
    try:
        file_name(f"file:{file}{STATE_SUFFIX}")
        return file_name(f"file:{file}")
    except ValueError:
        raise errors.BadRequest(f"bad snapshot name {file[:80]!r}: a plain file name in the agent's --snapshot-dir, "
                         f"1-{64 - len(STATE_SUFFIX)} letters, digits, '.', '-' or '_', not starting with '.'") \
            from None


def _pace_before(guest: HostedGuest, t_ns: int) -> float:
    """The guest's ops per second over the PACE_WINDOW_S before t_ns (0 if unknown)."""
    progress = guest.process.progress if guest.process is not None else []
    points = [(t, o) for t, o in list(progress) if t_ns - PACE_WINDOW_S * 1e9 <= t <= t_ns]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return 0.0
    return (points[-1][1] - points[0][1]) / ((points[-1][0] - points[0][0]) / 1e9)


class SnapshotJob:
    """One live snapshot of `guest` into `file` in `directory`; starts in the constructor."""

    def __init__(self, guest: HostedGuest, directory: BackingDir, file: str) -> None:
        if guest.process is None:
            raise errors.FailedPrecondition(f"guest {guest.name!r} is an image: it has no runner to snapshot")
        if guest.run_id or guest.state not in ("running", "paused"):
            raise errors.FailedPrecondition(f"guest {guest.name!r} is {guest.state}"
                                            + (f" (run {guest.run_id})" if guest.run_id else "") + ": no snapshot now")
        snapshot_name(file)
        self.guest = guest
        self.directory = directory
        try:
            self.made, fd = directory.create(f"file:{file}", guest.spec.size)
        except errors.AlreadyExists:
            raise errors.AlreadyExists(f"snapshot {file} already exists in {directory.path}: choose another name "
                                       "(an agent never writes into a file it did not create)") from None
        self.file = file
        self.error = ""
        self.phase = Phase.RUNNING
        self.last: dict = {}
        try:
            self.taken = guest.process.snapshot(fd)
        except BaseException:
            self.made.remove()
            raise
        finally:
            os.close(fd)  # the runner has its own copy
        self.pace_before = _pace_before(guest, int(self.taken["t_ns"]))
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"snapshot-{file}")
        self._watcher.start()

    def _watch(self) -> None:
        process = self.guest.process
        assert process is not None, "a snapshot is taken of a running guest"
        try:
            while True:
                self.last = process.snapshot_status()
                if self.last["done"]:
                    break
                time.sleep(POLL_EVERY)
            if self.last["error"]:
                raise RuntimeError(f"saving the guest's memory failed: {self.last['error']}")
            self._write_state()
            self.phase = Phase.COMPLETE
            log.info("snapshot %s of guest %s complete: %d pages, %d WP faults", self.file, self.guest.name,
                     self.last["pages_saved"], self.last["wp_faults"])
        except (RuntimeError, TimeoutError, OSError) as err:
            self.error = str(err)
            self.phase = Phase.FAILED
            self.made.remove()
            log.warning("snapshot %s of guest %s failed: %s", self.file, self.guest.name, err)

    def _write_state(self) -> None:
        doc = state_doc(self.guest.name, self.guest.spec, self.guest.content, self.taken)
        name = self.file + STATE_SUFFIX
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.directory.fd)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())

    def progress(self) -> pb.SnapshotProgress:
        s = self.last
        return pb.SnapshotProgress(
            guest=self.guest.name, file=self.file, phase=self.phase, error=self.error,
            pages_total=s.get("pages_total", self.guest.page_count), pages_saved=s.get("pages_saved", 0),
            pages_streamed=s.get("pages_streamed", 0), pages_faulted=s.get("pages_faulted", 0),
            wp_faults=s.get("wp_faults", 0), waited=s.get("waited", 0),
            blocked_ms=s.get("blocked_ns", 0) / 1e6, max_blocked_ms=s.get("max_blocked_ns", 0) / 1e6,
            bytes_written=s.get("bytes_written", 0), elapsed_s=s.get("elapsed_ns", 0) / 1e9,
            downtime_ms=float(self.taken["downtime_ms"]), ops_at_snapshot=int(self.taken["ops"]),
            ops_now=int(s.get("ops_done", self.taken["ops"])), ops_per_s_before=self.pace_before)


class Snapshots:
    """file -> SnapshotJob of one agent."""

    def __init__(self, directory: BackingDir | None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._jobs: dict[str, SnapshotJob] = {}

    def _dir(self) -> BackingDir:
        if self.directory is None:
            raise errors.FailedPrecondition("this agent keeps no snapshots: start it with --snapshot-dir DIR "
                                            "(or --backing-dir)")
        return self.directory

    def start(self, guest: HostedGuest, file: str) -> SnapshotJob:
        job = SnapshotJob(guest, self._dir(), file)
        with self._lock:
            self._jobs[file] = job
            finished = [f for f, j in self._jobs.items() if j.phase != Phase.RUNNING]
            for old in finished[:-KEEP_FINISHED]:  # oldest first: dicts keep insertion order
                del self._jobs[old]
        return job

    def get(self, file: str) -> SnapshotJob:
        with self._lock:
            job = self._jobs.get(file)
        if job is None:
            raise errors.GuestNotFound(f"no snapshot {file[:80]!r} was taken by this agent")
        return job

    def path(self, file: str) -> str:
        """Where snapshot `file` is (ValueError for a bad name or no directory)."""
        directory = self._dir()
        return os.path.join(directory.path, snapshot_name(file))
