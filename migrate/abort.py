"""`migrate abort`: the way out of a migration that cannot finish.

The source keeps a guest's memory, paused, from the switchover until
CompleteOutgoing releases it, so a post-copy that failed (recovery timeout,
a destination agent lost) can always be undone there: the guest resumes on
the source from the state it had at the pause. What must never happen is
a guest running in two places: once the guest has resumed on the
destination it writes pages there that the source never sees, and
resuming the source's copy too would split it in two. So after the
switchover the source's copy is resumed only when the destination's copy
is known to be stopped for good:

* the destination's run failed or never started the guest (phase
  "prepared"): AbortIncoming stops its runner first, then the source resumes;
* the destination knows neither the run nor a guest of that name (its
  agent restarted without --state-dir: the runner died with it);
* the destination cannot be reached and the user says it is gone (--force).

A run that is still running (it may be reconnecting to the source) or
complete (the guest lives on the destination) is refused, with the reason
and what to do instead. Before the switchover the guest never left the
source: aborting is always safe.
"""
from __future__ import annotations

from migrate.client import AgentClient
from migrate.errors import AgentError, FailedPrecondition
from migrate.names import Phase
from migrate.proto import migrate_pb2 as pb
from migrate.security import Credentials


def command(name: str, src: str, dst: str, *, resume: bool = False) -> str:
    """The command line that finishes (`resume`) or undoes a migration of `name`."""
    if resume:
        return f"migrate run {name} --from {src} --to {dst} --resume"
    return f"migrate abort {name} --from {src}" + (f" --to {dst}" if dst else "")


def abort(name: str, src: str, dst: str = "", *, force: bool = False,
          credentials: Credentials | None = None) -> str:
    """Abort the migration of `name` and resume it on `src`; return what was done (one line).

    Raises FailedPrecondition with the reason when that is not safe or not possible.
    """
    with AgentClient(src, credentials=credentials) as source:
        try:
            info = source.call("InspectGuest", pb.GuestRef(name=name))
        except AgentError as err:
            if err.unreachable:
                raise
            raise FailedPrecondition(f"the source {src} no longer holds guest {name!r} ({err}): there is nothing to "
                             f"resume there; if the migration completed the guest runs on the destination") from None
        if not info.run_id:
            raise FailedPrecondition(f"guest {name!r} on {src} is not being migrated ({info.state}): nothing to abort")
        run = pb.RunRef(run_id=info.run_id)
        switched = info.state == "migrating-out"
        if switched and not info.pid:
            raise FailedPrecondition(f"the source {src} holds guest {name!r}'s memory but no runner to resume it "
                             f"(its agent restarted after the switchover): finish the migration with "
                             f"`{command(name, src, dst or 'DST', resume=True)}`")
        dest_note = _abort_incoming(name, run, src, dst, switched=switched, force=force, credentials=credentials)
        source.call("AbortOutgoing", run)
    return f"aborted run {run.run_id}: guest {name!r} runs on {src} again{dest_note}"


def _abort_incoming(name: str, run: pb.RunRef, src: str, dst: str, *, switched: bool, force: bool,
                    credentials: Credentials | None) -> str:
    """Stop the destination's side of `run`, or raise FailedPrecondition if the source must not resume.

    Returns a note for the summary line.
    """
    if not dst:
        if switched and not force:
            raise FailedPrecondition(f"guest {name!r} has switched over and may run on the destination: name it "
                             f"with --to so its run can be checked and stopped (or --force if it is gone for good)")
        return " (the destination was not told: pass --to to clean it up)" if not switched else \
            " (the destination was not checked: --force)"
    try:
        dest = AgentClient(dst, credentials=credentials)
    except AgentError as err:
        if switched and not force:
            raise FailedPrecondition(f"cannot reach the destination {dst} ({err}); the guest may run there, so it "
                             f"is not resumed on the source: if the destination is gone for good, "
                             f"add --force") from None
        return f" (the destination {dst} was unreachable)"
    with dest:
        try:
            status = dest.call("IncomingStatus", run)
        except AgentError as err:
            if err.unreachable and switched and not force:
                raise FailedPrecondition(f"the destination {dst} does not answer ({err}): add --force if it is gone "
                                 f"for good") from None
            hosted = {g.name: g for g in dest.call("ListGuests", pb.ListGuestsRequest()).guests}
            if switched and name in hosted and hosted[name].state != "migrating-in":
                raise FailedPrecondition(f"guest {name!r} runs on the destination {dst} ({hosted[name].state}): "
                                 f"resuming it on the source would split it in two") from None
            return f" (the destination {dst} had lost the run)"
        if switched and status.phase == Phase.COMPLETE:
            raise FailedPrecondition(f"the migration of {name!r} completed: the guest runs on {dst} now; release it "
                             f"on the source with `{command(name, src, dst, resume=True)}`")
        if switched and status.phase == Phase.RUNNING:
            raise FailedPrecondition(
                f"guest {name!r} runs on the destination {dst} ({status.pages_received} of {status.pages_total} "
                f"pages in): it has written pages there since the switchover, and resuming it on the source would "
                f"split it in two; wait for the run to complete or fail (the recovery timeout), then try again")
        dest.call("AbortIncoming", run)
        return f" (the destination's run, {status.phase}, was aborted)"
