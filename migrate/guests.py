"""The guests an agent hosts: runner processes and memory images.

An agent owns each guest's memory file descriptor (a memfd it created, or an
image file) and a read-only shared mapping of it, from which the source
serves pages without ever copying guest RAM.
"""
from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

from migrate import errors
from migrate.backing import BackingDir, BackingFile
from migrate.guest.process import GuestProcess, GuestSpec
from migrate.guest.workloads import fill_random
from migrate.names import Content, GuestKind, Workload, parse
from migrate.proto import migrate_pb2 as pb
from migrate.snapshot_image import read_state
from migrate.validate import guest_name, spec_fits


def spec_to_pb(spec: GuestSpec, content: str = Content.REALISTIC) -> pb.GuestSpec:
    return pb.GuestSpec(size=spec.size, workload=spec.workload, seed=spec.seed, ops=spec.ops,
                        threads=spec.threads, ops_per_sec=spec.ops_per_sec, page_size=spec.page_size,
                        content=content, kind=spec.kind)


def content_from_pb(msg: pb.GuestSpec) -> str:
    """The spec's RAM content; BadRequest for an unknown one."""
    with errors.bad_request():
        return parse(Content, msg.content or Content.REALISTIC, "guest content")


def spec_from_pb(msg: pb.GuestSpec) -> GuestSpec:
    """A validated GuestSpec; BadRequest with a clear message otherwise.

    GuestSpec.validate raises ValueError (the runner checks its arguments
    with it too, without the agent's errors): here, a client's spec."""
    spec = GuestSpec(size=msg.size, workload=msg.workload or Workload.RANDOM_WRITE, seed=msg.seed,
                     ops=msg.ops, threads=msg.threads or 1, ops_per_sec=msg.ops_per_sec,
                     page_size=msg.page_size or mmap.PAGESIZE, kind=msg.kind or GuestKind.SYNTHETIC)
    with errors.bad_request():
        spec.validate()
    return spec_fits(spec)


def create_memfd(name: str, size: int) -> int:
    """A sealed-size memfd for guest RAM (MFD_CLOEXEC: passed on explicitly)."""
    return _sized(os.memfd_create(f"migrate-guest-{name}", os.MFD_CLOEXEC), size)


def _sized(fd: int, size: int) -> int:
    """`fd`, truncated to `size` (closed if that fails)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class HostedGuest:
    """One guest on this agent. `mem` is a read-only view of its RAM."""

    name: str
    spec: GuestSpec
    kind: str                       # "runner" or "image"
    fd: int
    process: GuestProcess | None = None
    state: str = "running"
    run_id: str = ""
    content: str = Content.REALISTIC
    backing: BackingFile | None = None  # when RAM lives in a file (migrate/backing.py)
    saved_state: dict | None = None     # an image's execution state (a snapshot's, migrate/snapshot_image.py)
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def page_count(self) -> int:
        return self.spec.size // self.spec.page_size

    @property
    def mem(self) -> memoryview:
        if self._map is None:
            self._map = mmap.mmap(self.fd, self.spec.size, mmap.MAP_SHARED, mmap.PROT_READ)
        return memoryview(self._map)

    def info(self, *, with_progress: bool = False) -> pb.GuestInfo:
        msg = pb.GuestInfo(name=self.name, spec=spec_to_pb(self.spec, self.content), state=self.state, kind=self.kind,
                           page_count=self.page_count, page_size=self.spec.page_size, run_id=self.run_id)
        if self.process is not None:
            msg.pid = self.process.pid
            try:
                stats = self.process.stats()
            except (RuntimeError, TimeoutError, OSError):
                stats = {}
            msg.ops_done = int(stats.get("ops_done", 0))
            msg.finished = bool(stats.get("finished", False))
            msg.first_op_ns = int(stats.get("first_op_ns", 0) or 0)
            msg.last_op_ns = int(stats.get("last_op_ns", 0) or 0)
            msg.vcpu_blocked_ms.extend(float(v) for v in stats.get("vcpu_blocked_ms", ()))
            msg.guest_digest = str(stats.get("guest_digest", ""))
            if msg.finished and self.state == "running":
                msg.state = "finished"
            if with_progress:
                msg.progress.extend(pb.ProgressPoint(t_ns=t, ops=o) for t, o in list(self.process.progress))
        return msg

    def close(self, *, keep_backing: bool = False) -> None:
        """Stop the runner (by PID, reaped) and release the memory.

        Its backing file goes too, unless `keep_backing`: a switched-over run
        journaled for a restarted agent still needs it.
        """
        if self.process is not None:
            self.process.stop()
            self.process = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a memoryview still exported; the mapping dies with it
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.backing is not None and not keep_backing:
            self.backing.remove()


class GuestTable:
    """Name -> HostedGuest, safe to use from gRPC worker threads."""

    def __init__(self, backing_dir: BackingDir | None = None) -> None:
        self._lock = threading.Lock()
        self._guests: dict[str, HostedGuest] = {}
        self._releasing: dict[str, threading.Thread] = {}  # name -> the thread stopping that guest (release())
        self.backing_dir = backing_dir

    def launch(self, name: str, spec: GuestSpec, *, start_paused: bool = False,
               content: str = Content.REALISTIC, backing: str = "") -> HostedGuest:
        """Create guest RAM and start a runner on it.

        "realistic" RAM is filled by the runner; "random" (incompressible,
        for measuring transfers without compression's help) is filled here,
        deterministically from the seed; "zero" RAM is left as it is made:
        holes, until the workload writes.
        """
        if spec.kind == GuestKind.KVM:
            from migrate.guest.kvm import kvm_problem
            if content != Content.REALISTIC:
                raise errors.BadRequest("a kvm guest's RAM is what its image writes: content must be realistic")
            if problem := kvm_problem():
                raise errors.KernelFeatureMissing(f"cannot run a kvm guest on this agent: {problem}")
        if backing and self.backing_dir is None:
            raise errors.BadRequest("this agent keeps no backing files: start it with --backing-dir DIR")
        self._reserve(name)
        fd = -1
        made = None
        try:
            if backing:
                assert self.backing_dir is not None  # checked above
                made, fd = self.backing_dir.create(backing, spec.size)
            else:
                fd = create_memfd(name, spec.size)
            if content == Content.RANDOM:
                with mmap.mmap(fd, spec.size, mmap.MAP_SHARED) as ram:
                    fill_random(ram, spec.seed)
            proc = GuestProcess.launch(spec, fd, start_paused=start_paused, fill=content == Content.REALISTIC)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if made is not None:
                made.remove()
            self._release(name)
            raise
        guest = HostedGuest(name, spec, "runner", fd, proc, state="paused" if start_paused else "running",
                            content=content, backing=made)
        return self._install(guest)

    def add_image(self, name: str, path: str, page_size: int = mmap.PAGESIZE, *, nofollow: bool = False) -> HostedGuest:
        """Serve a memory image file as a guest's RAM (read-only).

        With a snapshot's state file next to it (PATH.state.json) the image
        is that guest, resumable elsewhere: its saved spec, content and
        execution state; without one, an idle guest of the image's size.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))
        except OSError as err:
            raise errors.BadRequest(f"cannot open image {path}: {err.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            saved = read_state(path, size)
            if saved is not None:
                spec, content, state = saved["spec"], saved.get("content", Content.REALISTIC), saved["state"]
            else:
                spec = GuestSpec(size=size, workload=Workload.IDLE, seed=0, ops=0, threads=1, page_size=page_size)
                content, state = Content.REALISTIC, None
            if size == 0 or size % spec.page_size:
                raise errors.BadRequest(f"image {path} is {size} bytes: not a positive multiple of the "
                                 f"{spec.page_size}-byte page")
            self._reserve(name)
        except BaseException:
            os.close(fd)
            raise
        return self._install(HostedGuest(name, spec, "image", fd, state="image", content=content,
                                         saved_state=state))

    def restore_switched(self, record: dict) -> HostedGuest:
        """A file-backed guest a dead predecessor had switched over: only its memory is left here.

        Its file is found where the journal says, in the directory the dead
        agent was given, whatever this agent's --backing-dir.
        """
        directory = self.backing_dir
        if directory is None or directory.path != record["backing_dir"]:
            directory = BackingDir(record["backing_dir"])
        made, fd = directory.reopen(record["backing"], record["spec"]["size"])
        guest = HostedGuest(record["name"], GuestSpec.from_dict(record["spec"]), "runner", fd, None,
                            state="migrating-out", run_id=record["run_id"],
                            content=record.get("content", Content.REALISTIC), backing=made)
        try:
            return self.adopt(guest)
        except BaseException:
            guest.close(keep_backing=True)
            raise

    def adopt(self, guest: HostedGuest) -> HostedGuest:
        """Host a guest created elsewhere (an incoming migration)."""
        self._reserve(guest.name)
        return self._install(guest)

    def get(self, name: str) -> HostedGuest:
        guest_name(name)  # bounded: a 100 KB name is refused, never echoed
        with self._lock:
            guest = self._guests.get(name)
        if guest is None:
            raise errors.GuestNotFound(f"no guest named {name!r} on this agent")
        return guest

    def all(self) -> list[HostedGuest]:
        with self._lock:
            return [g for g in self._guests.values() if g is not None]

    def remove(self, name: str, *, keep_backing: bool = False) -> HostedGuest:
        with self._lock:
            guest = self._guests.pop(name, None)
        if guest is None:
            raise errors.GuestNotFound(f"no guest named {name!r} on this agent")
        guest.close(keep_backing=keep_backing)
        return guest

    def release(self, name: str) -> HostedGuest:
        """Remove a guest that has moved elsewhere; stop its runner and free its RAM in the background.

        Stopping a runner and freeing its memory took 70-90 ms for 256 MiB,
        which a finished migration's CompleteOutgoing paid and a drain's next
        run waited for. The name stays taken until the release is done: a
        guest of that name arriving here meanwhile (migrated back at once)
        waits for it in _reserve, so it never meets the old one's backing file.
        """
        with self._lock:
            guest = self._guests.get(name)
            if guest is None:
                raise errors.GuestNotFound(f"no guest named {name!r} on this agent")
            self._guests[name] = None  # type: ignore[assignment]  # placeholder until released
            thread = threading.Thread(target=self._close_released, args=(guest,), daemon=True,
                                      name=f"release-{name}"[:15])
            self._releasing[name] = thread
        thread.start()
        return guest

    def _close_released(self, guest: HostedGuest) -> None:
        try:
            guest.close()
        finally:
            with self._lock:
                self._releasing.pop(guest.name, None)
                self._guests.pop(guest.name, None)

    def _wait_released(self, name: str | None = None) -> None:
        """Wait for the background release of guest `name` (None: of every guest) to finish."""
        with self._lock:
            threads = [t for n, t in self._releasing.items() if name is None or n == name]
        for t in threads:
            t.join()

    def close_all(self, keep_backing: frozenset[str] = frozenset()) -> None:
        """Stop every guest; those named in `keep_backing` keep their backing files."""
        for guest in self.all():
            self.remove(guest.name, keep_backing=guest.name in keep_backing)
        self._wait_released()

    def _reserve(self, name: str) -> None:
        guest_name(name)
        self._wait_released(name)
        with self._lock:
            if name in self._guests:
                raise errors.AlreadyExists(f"a guest named {name!r} already exists on this agent")
            self._guests[name] = None  # type: ignore[assignment]  # placeholder while launching

    def _release(self, name: str) -> None:
        with self._lock:
            self._guests.pop(name, None)

    def _install(self, guest: HostedGuest) -> HostedGuest:
        with self._lock:
            self._guests[guest.name] = guest
        return guest
