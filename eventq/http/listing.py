"""``GET /api/jobs``: the jobs table of the web page, filtered, sorted, in keyset pages.

A page ends with a cursor naming its last row by its sort value and job id; the next page
is every matching row after that pair, so a row that moves or a job that arrives while the
reader scrolls never makes a page repeat or skip one that stayed where it was (an offset
would). Each page names the last event it reflects (``seq``), so the page applies only the
events of the stream after it. Sorting by job id is sorting by submission: ids grow with the clock.

The default sort (by submission) and the sort by status, filtered by status and user only,
are read from the sorted ids the scheduler's state keeps per status and user: a page costs
the same with a million jobs as with a hundred. The other sorts, and a name or node filter,
sort the matching jobs.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import heapq
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from sortedcontainers import SortedList

from eventq.actors.scheduler_state import JobState, SchedulerState
from eventq.http.common import ORCH, ApiError
from eventq.http.queue import int_param
from eventq.projections.queue import UnknownStatus, _statuses

routes = web.RouteTableDef()

#: Where each status sorts: what runs, what queues, what waits for something, what ended.
STATUS_RANK = {"running": 0, "dispatched": 1, "pending": 2, "waiting": 3, "blocked": 4,
               "held": 5, "failed": 6, "cancelled": 7, "rejected": 8, "completed": 9}
SortKey = Callable[[JobState], Any]
#: Each sort's key, and the type of its values (a cursor must carry one).
SORTS: dict[str, tuple[SortKey, type]] = {
    "submitted": (lambda j: j.spec.job_id, str),
    "priority": (lambda j: j.spec.effective_base, int),
    "status": (lambda j: STATUS_RANK.get(j.status, 99), int),
    "user": (lambda j: j.spec.user, str),
    "name": (lambda j: j.spec.name, str),
    "gpus": (lambda j: j.spec.gpus, int),
}
#: Rows one page may hold, and job ids one ``ids=`` request may name.
MAX_PAGE = 1000
MAX_IDS = 40
#: The longest value of each text parameter, and what it may hold (as documented).
TEXT_PARAMS = {"user": (100, None), "node": (100, None), "name": (200, None),
               "after": (1400, re.compile(r"[A-Za-z0-9_=-]*")),
               "ids": (MAX_IDS * 13, re.compile(r"[A-Za-z0-9_,-]*"))}


def _check_text(request: web.Request) -> None:
    for name, (longest, allowed) in TEXT_PARAMS.items():
        value = request.query.get(name)
        if value is None:
            continue
        if len(value) > longest:
            raise ApiError(422, f"{name} is longer than {longest} characters", name)
        if allowed is not None and not allowed.fullmatch(value):
            raise ApiError(422, f"{name} holds characters it never does", name)


def encode_cursor(value: Any, job_id: str) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([value, job_id])).decode()


def decode_cursor(raw: str, sort: str) -> tuple[Any, str]:
    """The (sort value, job id) a cursor names; 422 for one this sort never gave."""
    try:
        value, job_id = msgspec.json.decode(base64.urlsafe_b64decode(raw.encode()),
                                            type=tuple[int | str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise ApiError(422, "after is not a cursor this listing gave", "after") from None
    if type(value) is not SORTS[sort][1]:
        raise ApiError(422, f"after is a cursor of another sort than {sort}", "after")
    return value, job_id


@dataclass(frozen=True)
class Filter:
    """What the rows must match: statuses, and optionally a user, a node, a name's part."""

    statuses: set[str]
    user: str | None
    node: str | None
    name: str

    def __call__(self, job: JobState) -> bool:
        return job.status in self.statuses and (self.user is None or job.spec.user == self.user) \
            and (self.node is None or job.node == self.node) \
            and (not self.name or self.name in job.spec.name.casefold())

    @property
    def indexed(self) -> bool:
        """Do the sorted ids by status (and user) hold exactly the matching jobs?"""
        return self.node is None and not self.name


def _matches(request: web.Request) -> Filter:
    query = request.query
    try:
        statuses = _statuses(query.get("status") or None, include_completed=True)
    except UnknownStatus as exc:
        raise ApiError(422, str(exc), "status") from None
    return Filter(statuses, query.get("user") or None, query.get("node") or None,
                  (query.get("name") or "").casefold())


def _sort(request: web.Request) -> tuple[str, bool]:
    sort, order = request.query.get("sort", "submitted"), request.query.get("order", "desc")
    if sort not in SORTS:
        raise ApiError(422, f"sort must be one of {sorted(SORTS)}", "sort")
    if order not in ("asc", "desc"):
        raise ApiError(422, "order must be asc or desc", "order")
    return sort, order == "desc"


def _by_ids(request: web.Request, raw: str) -> web.Response:
    """The rows of these jobs as they are now (the page refreshes what it shows)."""
    ids = [i for i in raw.split(",") if i]
    if len(ids) > MAX_IDS:
        raise ApiError(422, f"ids names at most {MAX_IDS} jobs", "ids")
    queue = request.app[ORCH].queue
    rows = [row for i in dict.fromkeys(ids) if (row := queue.job(i, detail=False)) is not None]
    return web.json_response({"jobs": rows, "total": len(rows), "next": None,
                              "seq": request.app[ORCH].log.head_seq})


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    _check_text(request)
    sort, descending = _sort(request)
    limit = int_param(request, "limit", 200, 1, MAX_PAGE)
    key, match = SORTS[sort][0], _matches(request)
    if (ids := request.query.get("ids")) is not None:
        return _by_ids(request, ids)
    orch = request.app[ORCH]
    cursor = decode_cursor(raw, sort) if (raw := request.query.get("after")) else None
    if sort == "submitted" and match.indexed:
        page, more, total = by_submission(orch.state, match, cursor, limit, descending)
    elif sort == "status" and match.indexed:
        page, more, total = by_status(orch.state, match, cursor, limit, descending)
    else:
        page, more, total = by_sorting(orch.state, key, match, cursor, limit, descending)
    rows = [orch.queue.job(job_id, detail=False) for _, job_id in page]
    return web.json_response({"jobs": rows, "total": total, "seq": orch.log.head_seq,
                              "next": encode_cursor(*page[-1]) if more and page else None})


Page = tuple[list[tuple[Any, str]], bool, int]


def by_sorting(state: SchedulerState, key: SortKey, match: Filter,
               cursor: tuple[Any, str] | None, limit: int, descending: bool) -> Page:
    """Every matching job sorted (O(jobs)): the sorts and filters no index keeps."""
    keyed = sorted((key(job), job_id) for job_id, job in state.jobs.items() if match(job))
    if descending:  # the rows below the cursor, highest first
        end = len(keyed) if cursor is None else bisect.bisect_left(keyed, cursor)
        return keyed[max(0, end - limit):end][::-1], end > limit, len(keyed)
    start = 0 if cursor is None else bisect.bisect_right(keyed, cursor)  # above, lowest first
    return keyed[start:start + limit], start + limit < len(keyed), len(keyed)


def sorted_ids(state: SchedulerState, match: Filter) -> dict[str, SortedList]:
    """The sorted ids of each matching status (and user) that has any."""
    if match.user is None:
        lists = {s: state.ids_by_status.get(s) for s in match.statuses}
    else:
        lists = {s: state.ids_by_user_status.get((s, match.user)) for s in match.statuses}
    return {s: ids for s, ids in lists.items() if ids}


def by_submission(state: SchedulerState, match: Filter, cursor: tuple[Any, str] | None,
                  limit: int, descending: bool) -> Page:
    """The same page as ``by_sorting`` by job id, merged from the sorted ids of each
    matching status (and user): O(page), whatever the number of jobs."""
    present = list(sorted_ids(state, match).values())
    after = None if cursor is None else cursor[1]
    runs = []
    for ids in present:
        if descending:
            end = len(ids) if after is None else ids.bisect_left(after)
            runs.append(ids.islice(0, end, reverse=True))
        else:
            start = 0 if after is None else ids.bisect_right(after)
            runs.append(ids.islice(start))
    found = list(itertools.islice(heapq.merge(*runs, reverse=descending), limit + 1))
    return [(i, i) for i in found[:limit]], len(found) > limit, sum(map(len, present))


def by_status(state: SchedulerState, match: Filter, cursor: tuple[Any, str] | None,
              limit: int, descending: bool) -> Page:
    """The same page as ``by_sorting`` by status: each status's sorted ids (one status a
    rank) one after another, in rank order. O(page), whatever the number of jobs."""
    present = sorted_ids(state, match)
    ranked = sorted(((STATUS_RANK.get(s, 99), ids) for s, ids in present.items()),
                    key=lambda r: r[0], reverse=descending)
    found: list[tuple[Any, str]] = []
    for rank, ids in ranked:
        if cursor is not None and (rank > cursor[0] if descending else rank < cursor[0]):
            continue  # wholly on the cursor's side already read
        at = cursor[1] if cursor is not None and rank == cursor[0] else None
        if descending:
            end = len(ids) if at is None else ids.bisect_left(at)
            run = ids.islice(0, end, reverse=True)
        else:
            run = ids.islice(0 if at is None else ids.bisect_right(at))
        found += ((rank, job_id) for job_id in itertools.islice(run, limit + 1 - len(found)))
        if len(found) > limit:
            break
    return found[:limit], len(found) > limit, sum(map(len, present.values()))
