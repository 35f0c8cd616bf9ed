"""``eventq replay why JOB`` and ``eventq replay at TIME gpus``: stories told by the log alone.

Both read the log file directly (verified from seq 1), whether a server runs or not.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from eventq import events as ev
from eventq import replay
from eventq.callbacks import story as callbacks_story
from eventq.cli import output
from eventq.cli.client import CliError
from eventq.cli.output import cell, duration, emit_json, stamp, table, when
from eventq.cli.provisions import READS as PROVISION_EVENTS
from eventq.cli.provisions import Provisions, wait_line
from eventq.log import LogCorrupt, Record
from eventq.redact import redact_text

#: The pseudo-reason for waiting time no recorded reason covers (e.g. before the
#: first scheduling pass after a submission, a requeue or a release).
UNRECORDED = "unrecorded"
WAITING = ("pending", "blocked", "held")


@dataclass
class Step:
    seq: int
    time: float
    by: str
    state: str
    detail: str


@dataclass
class ReasonTime:
    code: str
    detail: str
    seconds: float = 0.0
    #: Set while the reason holds the job: since when.
    open_since: float | None = None


@dataclass
class Wait:
    attempt: int
    start: float
    end: float | None = None


@dataclass
class Story:
    """One job's life, folded from its events: each state, and why and how long it waited."""

    job_id: str
    name: str = ""
    user: str = ""
    status: str = "unknown"
    attempt: int = 0
    steps: list[Step] = field(default_factory=list)
    reasons: dict[str, ReasonTime] = field(default_factory=dict)
    waits: list[Wait] = field(default_factory=list)
    runs: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: What a batch system did for it (requests made for it, the workers it ran on).
    provisions: Provisions = field(init=False)

    def __post_init__(self) -> None:
        self.provisions = Provisions(self.job_id)

    # --- folding ---------------------------------------------------------------------

    def evolve(self, r: Record) -> None:
        e, t = r.event, r.time
        if isinstance(e, PROVISION_EVENTS):
            told = self.provisions.step(e, t)
            if told is not None:
                self.steps.append(Step(r.seq, t, r.principal, *told))
            return
        state, detail = self._apply(e, t)
        if state:  # details quote what workers and admins wrote: tokens are hidden
            self.steps.append(Step(r.seq, t, r.principal, state, redact_text(detail)))
        if isinstance(e, ev.JobSubmitted) and e.reasons is not None:
            # It waited from its submission: the step a JobReasonsChanged told before.
            changed = ev.JobReasonsChanged(job_id=e.job.job_id, reasons=e.reasons)
            state, detail = self._reasons_changed(changed, t)  # decided by the scheduler
            self.steps.append(Step(r.seq, t, "system", state, redact_text(detail)))

    def _apply(self, e: ev.Event, t: float) -> tuple[str, str]:
        """The state an event puts the job in and its detail; ("", "") for events that
        tell nothing of the job's story."""
        told = STORY.get(type(e))
        if told is not None:
            return told(self, e, t)
        return callbacks_story.step(e, t) or ("", "")

    def _submitted(self, e: ev.JobSubmitted, t: float) -> tuple[str, str]:
        spec = e.job
        self.name, self.user = spec.name, spec.user
        self._wait(t, "pending", {})
        extra = f", config {spec.config_name}" if spec.config_name else ""
        return "submitted", (f"{spec.gpus} GPUs, priority {spec.effective_base}, "
                             f"target {spec.target}{extra}")

    def _reasons_changed(self, e: ev.JobReasonsChanged, t: float) -> tuple[str, str]:
        self._set_reasons(t, {x.code: x.detail for x in e.reasons})
        return "waiting", "; ".join(f"{x.code}: {x.detail}" for x in e.reasons) or \
            "no reason left"

    def _blocked(self, e: ev.JobBlocked, t: float) -> tuple[str, str]:
        self._wait(t, "blocked", {"approval": e.reason})
        return "blocked", f"waits for an admin's approval: {e.reason}"

    def _approved(self, e: ev.JobApproved, t: float) -> tuple[str, str]:
        self._wait(t, "pending", {})
        return "approved", "back in the queue"

    def _released(self, e: ev.JobReleased, t: float) -> tuple[str, str]:
        self._wait(t, "pending", {})
        return "released", "back in the queue"

    def _held(self, e: ev.JobHeld, t: float) -> tuple[str, str]:
        self._wait(t, "held", {"held": "held until released"})
        return "held", "kept from starting until released"

    def _dispatched(self, e: ev.AttemptDispatched, t: float) -> tuple[str, str]:
        waited = self._end_wait(t)
        self.status, self.attempt = "dispatched", e.attempt
        self.runs.append((e.attempt, t, None))
        return "dispatched", (f"attempt {e.attempt} on {e.node} GPUs {cell(e.gpus)}"
                              + self.provisions.dispatched(e.node, t)
                              + (f", after waiting {duration(waited)}"
                                 if waited is not None else ""))

    def _started(self, e: ev.AttemptStarted, t: float) -> tuple[str, str]:
        self.status = "running"
        return "running", f"attempt {e.attempt}, pid {e.pid}" + \
            (" (adopted after a restart)" if e.adopted else "")

    def _ended(self, e: ev.AttemptEnded, t: float) -> tuple[str, str]:
        ran = self._end_run(e.attempt, t)
        code = "" if e.exit_code is None else f", exit code {e.exit_code}"
        return "attempt ended", (f"attempt {e.attempt} {e.outcome}{code}"
                                 + (f" after {duration(ran)}" if ran is not None else "")
                                 + (f": {e.detail}" if e.detail else ""))

    def _requeued(self, e: ev.JobRequeued, t: float) -> tuple[str, str]:
        self._wait(t, "pending", {})
        return "requeued", f"as attempt {e.next_attempt}: {e.reason}"

    def _completed(self, e: ev.JobCompleted, t: float) -> tuple[str, str]:
        return self._finish(t, "completed"), ""

    def _failed(self, e: ev.JobFailed, t: float) -> tuple[str, str]:
        return self._finish(t, "failed"), e.reason

    def _cancelled(self, e: ev.JobCancelled, t: float) -> tuple[str, str]:
        return self._finish(t, "cancelled"), ""

    def _rejected(self, e: ev.JobRejected, t: float) -> tuple[str, str]:
        return self._finish(t, "rejected"), "; ".join(f"{x.code}: {x.detail}"
                                                      for x in e.reasons)

    def _wait(self, t: float, status: str, reasons: dict[str, str]) -> None:
        """Enter (or stay in) a waiting state held by ``reasons``."""
        if status == "pending" and self.status not in WAITING:
            self.waits.append(Wait(self.attempt + 1, t))
        self.status = status
        self._set_reasons(t, reasons)

    def _set_reasons(self, t: float, reasons: dict[str, str]) -> None:
        if self.status not in WAITING:
            return
        current = dict(reasons) or {UNRECORDED: "no reason recorded yet (before a "
                                                "scheduling pass looked at it)"}
        for code, rt in self.reasons.items():
            if rt.open_since is not None and code not in current:
                rt.seconds += t - rt.open_since
                rt.open_since = None
        for code, detail in current.items():
            rt = self.reasons.setdefault(code, ReasonTime(code, detail))
            rt.detail = detail
            if rt.open_since is None:
                rt.open_since = t

    def _close_reasons(self, t: float) -> None:
        for rt in self.reasons.values():
            if rt.open_since is not None:
                rt.seconds += t - rt.open_since
                rt.open_since = None

    def _end_wait(self, t: float) -> float | None:
        self._close_reasons(t)
        if self.waits and self.waits[-1].end is None:
            self.waits[-1].end = t
            return t - self.waits[-1].start
        return None

    def _end_run(self, attempt: int, t: float) -> float | None:
        for i, (a, start, end) in enumerate(self.runs):
            if a == attempt and end is None:
                self.runs[i] = (a, start, t)
                return t - start
        return None

    def _finish(self, t: float, status: str) -> str:
        if self.status in WAITING:
            self._end_wait(t)
        self.status = status
        return status

    # --- reading ---------------------------------------------------------------------

    def waiting(self) -> bool:
        return bool(self.waits) and self.waits[-1].end is None

    def summary(self, now: float) -> dict[str, Any]:
        """As JSON; an open wait and its reasons count up to ``now``."""
        waits = [{"attempt": w.attempt, "start": w.start, "end": w.end,
                  "seconds": (w.end if w.end is not None else now) - w.start}
                 for w in self.waits]
        reasons: list[dict[str, Any]] = []
        for rt in self.reasons.values():
            seconds = rt.seconds + (now - rt.open_since if rt.open_since is not None else 0.0)
            if rt.code != UNRECORDED or seconds > 0:
                reasons.append({"code": rt.code, "detail": rt.detail, "seconds": seconds,
                                "still_waiting": rt.open_since is not None})
        return {
            "job_id": self.job_id, "name": self.name, "user": self.user,
            "status": self.status, "still_waiting": self.waiting(), "as_of": now,
            "steps": [{"seq": s.seq, "time": s.time, "by": s.by, "state": s.state,
                       "detail": s.detail} for s in self.steps],
            "reasons": reasons, "waits": waits,
            "total_wait_seconds": sum(w["seconds"] for w in waits),
            "runs": [{"attempt": a, "start": s, "end": e,
                      "seconds": None if e is None else e - s} for a, s, e in self.runs],
            "provider_waits": self.provisions.waits,
            "provider_pending": self.provisions.pending() if self.waiting() else [],
        }


#: How an event type moves a job's story on: (state, detail), folding it into the story.
Told = Callable[["Story", Any, float], tuple[str, str]]
STORY: dict[type[ev.Event], Told] = {
    ev.JobSubmitted: Story._submitted,
    ev.JobReasonsChanged: Story._reasons_changed,
    ev.JobBlocked: Story._blocked,
    ev.JobApproved: Story._approved,
    ev.JobHeld: Story._held,
    ev.JobReleased: Story._released,
    ev.PriorityChanged: lambda _, e, t: ("priority", "back to the owner's level"
                                         if e.priority_override is None
                                         else f"set to {e.priority_override}"),
    ev.AttemptDispatched: Story._dispatched,
    ev.AttemptStarted: Story._started,
    ev.AttemptStopRequested: lambda _, e, t: ("stopping", f"attempt {e.attempt}: {e.reason}"),
    ev.AttemptEnded: Story._ended,
    ev.JobRequeued: Story._requeued,
    ev.JobCompleted: Story._completed,
    ev.JobFailed: Story._failed,
    ev.JobCancelled: Story._cancelled,
    ev.JobRejected: Story._rejected,
    ev.JobsPurged: lambda _, e, t: (
        "purged", f"removed from the queue views (finished over {e.older_than_days} days "
                  "before); its events stay in the log"),
    ev.StaleReportIgnored: lambda _, e, t: (
        "ignored", f"a late '{e.report}' report of attempt {e.attempt} "
                   f"(current: {e.current_attempt})"),
}


def story_of(job_id: str, records: Iterable[Record]) -> Story | None:
    story = Story(job_id)
    for r in records:
        story.evolve(r)
    return story if story.steps else None


# --- commands ------------------------------------------------------------------------


def why(args: argparse.Namespace, conn: Any) -> int:
    try:
        story = story_of(args.job_id, replay.job_history(conn, args.job_id, PROVISION_EVENTS))
    except LogCorrupt as exc:
        raise CliError(str(exc)) from None
    if story is None:
        raise CliError(f"no job {args.job_id} in the log")
    last = story.steps[-1].time
    summary = story.summary(max(time.time(), last) if story.waiting() else last)
    if args.format == "json":
        emit_json(summary)
        return 0
    from rich.markup import escape  # rich loads only when it draws

    console = output.console
    console.print(f"job {escape(story.job_id)} ({escape(story.name)}, {escape(story.user)}): "
                  f"[bold]{summary['status']}[/bold]")
    now = time.time()
    table([{"seq": s["seq"], "time": stamp(s["time"], now), "by": s["by"], "state": s["state"],
            "detail": s["detail"]} for s in summary["steps"]],
          ["seq", "time", "by", "state", "detail"])
    if summary["reasons"]:
        console.print("waited on (reasons can overlap; each counts its own time):")
        table([{"reason": x["code"], "for": duration(x["seconds"])
                + (" so far" if x["still_waiting"] else ""), "detail": x["detail"]}
               for x in summary["reasons"]], ["reason", "for", "detail"])
    for wait in summary["provider_waits"]:
        console.print(wait_line(wait), markup=False)
    for pending in summary["provider_pending"]:
        console.print(f"still waiting for {pending}", markup=False)
    total = duration(summary["total_wait_seconds"])
    per_attempt = ", ".join(f"attempt {w['attempt']}: {duration(w['seconds'])}"
                            for w in summary["waits"])
    console.print(f"total wait: {total}" + (" so far (still waiting)" if story.waiting()
                                            else "")
                  + (f" ({escape(per_attempt)})" if len(summary["waits"]) > 1 else ""))
    return 0


def parse_time(text: str) -> float:
    """Epoch seconds, or ISO-8601 (local time unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"cannot read the time {text!r}: give ISO-8601 local time "
                       "(2024-05-01T14:30:00), epoch seconds, or a seq with --seq") from None
    return moment.timestamp()


def at(args: argparse.Namespace, conn: Any) -> int:
    to_seq, at_time = _moment(args)
    try:
        held = replay.holdings_at(conn, to_seq=to_seq, at_time=at_time)
    except LogCorrupt as exc:
        raise CliError(str(exc)) from None
    folded = held.folded
    if folded.last_seq == 0:
        start = "the log is empty" if held.first_time is None else \
            f"the log starts at {when(held.first_time)} (seq 1)"
        hint = " (for an event number, add --seq)" if args.time.isdigit() else ""
        raise CliError(f"nothing was recorded by then: {start}{hint}")
    rows = _holders(held)
    out = {"at_seq": folded.last_seq, "at_time": at_time, "last_event_time": folded.last_time,
           "gpus": rows}
    if args.format == "json":
        emit_json(out)
        return 0
    asked = f"seq {to_seq}" if to_seq is not None else when(at_time)
    output.console.print(f"GPUs at {asked}: the state after seq {folded.last_seq} "
                         f"({when(folded.last_time)})", markup=False)
    moment = folded.last_time if at_time is None else at_time
    for row in rows:
        row["held for"] = duration(moment - row["since"]) if row["since"] else None
        row["since"] = stamp(row["since"], time.time()) if row["since"] else None
    table(rows, ["node", "gpu", "model", "job_id", "attempt", "user", "name", "since",
                 "held for"])
    return 0


def _moment(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """``at``'s TIME: a seq with --seq, else a time."""
    if not args.seq:
        return None, parse_time(args.time)
    try:
        return int(args.time), None
    except ValueError:
        raise CliError(f"--seq wants an event number, not {args.time!r}") from None


def _holders(held: replay.Holdings) -> list[dict[str, Any]]:
    """Each GPU of each node, and who held it then, since when."""
    folded = held.folded
    jobs = folded.scheduler.jobs
    rows: list[dict[str, Any]] = []
    for node_name, node in sorted(folded.gpus.nodes.items()):
        for gpu, info in sorted(node.gpus.items()):
            holder = node.held.get(gpu)
            job = jobs.get(holder[0]) if holder else None
            rows.append({
                "node": node_name, "gpu": gpu, "model": info.name,
                "job_id": holder[0] if holder else None,
                "attempt": holder[1] if holder else None,
                "user": job.spec.user if job else None,
                "name": job.spec.name if job else None,
                "since": held.since.get((node_name, gpu)) if holder else None})
    return rows
