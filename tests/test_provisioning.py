"""How many workers eventq asks a batch system for, and what it reads of Slurm's answers:
the pure parts of the provider (``eventq.provisioning``, ``eventq.slurm``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from eventq import events as ev
from eventq.actors.provisioner import REVIEW_GAP, Provisioner
from eventq.actors.requests_state import Requests, TaskState
from eventq.actors.scheduler_state import JobState
from eventq.auth import task_token
from eventq.clock import SimClock
from eventq.log import Record
from eventq.policy import Counts, NodeView
from eventq.provider import Observed, Offer, Sighting
from eventq.provisioning import Queue, assess, observed_changes
from eventq.slurm import (
    FAILED_DIR,
    KEEP_FAILED,
    SlurmProvider,
    SlurmSettings,
    SlurmSettingsError,
    parse_gres,
    parse_time,
    partition_limit,
    sightings,
)
from tests.serverproc import clean_env, server_argv

NOW = 1_700_000_000.0
ROOMY = ev.Limits(max_concurrent=100, user_max_concurrent=100)


def offer(gpus: int = 1, max_workers: int = 4, budget: float | None = None) -> Offer:
    return Offer("slurm", {"slurm_partition": "debug"}, gpus, budget, max_workers,
                 gpus_source="--slurm-gres", budget_source="--slurm-time",
                 max_source=f"--slurm-max-workers {max_workers}")


def job(n: int, gpus: int = 1, **spec: Any) -> JobState:
    fields = {"target": "worker", **spec}
    return JobState(ev.JobSpec(job_id=f"j{n}", user="alice", priority=10, command="true",
                               gpus=gpus, **fields), order=n, queued_at=NOW)


def queue(*jobs: JobState, nodes: list[NodeView] | None = None,
          limits: ev.Limits = ROOMY) -> Queue:
    return Queue(lambda: iter(jobs), Counts(), limits, nodes or [], NOW)


class Log:
    """Requests folded from events, as the server folds them."""

    def __init__(self) -> None:
        self.requests = Requests()
        self.seq = 0

    def add(self, *events: ev.Event) -> Requests:
        for e in events:
            self.seq += 1
            self.requests.evolve(Record(self.seq, NOW, "system", e, b""))  # type: ignore[arg-type]
        return self.requests


def asked(log: Log, request: str, workers: int, batch: str | None = "12",
          for_jobs: tuple[str, ...] = ("j1",)) -> Requests:
    log.add(ev.WorkersRequested(request_id=request, provider="slurm",
                                workers=[f"w_{request}{i}" for i in range(workers)],
                                for_jobs=list(for_jobs)))
    if batch is not None:
        log.add(ev.WorkersRequestSubmitted(request_id=request, batch_id=batch))
    return log.requests


# --- how many workers --------------------------------------------------------------------


def test_a_two_gpu_job_on_a_partition_of_two_gpu_workers_asks_for_one() -> None:
    demand = assess(queue(job(1, gpus=2)), Requests(), set(), offer(gpus=2))
    assert (demand.new_workers, demand.for_jobs) == (1, ["j1"])


def test_one_gpu_jobs_are_packed_as_the_policy_places_them() -> None:
    jobs = [job(n) for n in range(1, 4)]
    assert assess(queue(*jobs), Requests(), set(), offer(gpus=1)).new_workers == 3
    packed = assess(queue(*jobs), Requests(), set(), offer(gpus=2))
    assert packed.new_workers == 2 and packed.for_jobs == ["j1", "j2", "j3"]


def test_workers_already_asked_for_absorb_the_demand_they_were_asked_for() -> None:
    requests = asked(Log(), "r1", 1)
    demand = assess(queue(job(1)), requests, set(), offer())
    assert demand.new_workers == 0 and demand.surplus == []
    assert demand.notes["j1"] == ev.Reason("no_worker", "slurm job 12_0 pending: queued")
    more = assess(queue(job(1), job(2)), requests, set(), offer())
    assert (more.new_workers, more.for_jobs) == (1, ["j2"]), "only what is not covered"


def test_never_beyond_max_workers_and_the_held_job_says_so() -> None:
    requests = asked(Log(), "r1", 1)
    demand = assess(queue(job(1), job(2)), requests, set(), offer(max_workers=1))
    assert demand.new_workers == 0
    assert "1 of 1 workers" in demand.notes["j2"].detail
    assert "--slurm-max-workers 1" in demand.notes["j2"].detail


def test_a_task_no_job_needs_any_more_is_surplus_once_waiting_in_slurm() -> None:
    log = Log()
    asked(log, "r1", 2)
    demand = assess(queue(job(1)), log.requests, set(), offer())
    assert [t.index for t in demand.surplus] == [1]
    assert [t.index for t in assess(queue(), log.requests, set(), offer()).surplus] == [0, 1]
    unsubmitted = asked(Log(), "r2", 1, batch=None)
    assert assess(queue(), unsubmitted, set(), offer()).surplus == [], \
        "a task sbatch has not answered for cannot be cancelled yet"


def test_jobs_held_by_a_limit_or_fitting_a_connected_worker_ask_for_nothing() -> None:
    limited = ev.Limits(max_concurrent=100, user_max_concurrent=1)
    busy = Counts()
    busy.by_user["alice"] = 1
    held = Queue(lambda: iter([job(1)]), busy, limited, [], NOW)
    assert assess(held, Requests(), set(), offer()).new_workers == 0
    worker = NodeView("w_x", False, {0}, 1, labels={"slurm_partition": "debug"})
    assert assess(queue(job(1), nodes=[worker]), Requests(), set(), offer()).new_workers == 0
    local_only = job(2, target="local")
    other_labels = job(3, worker_labels={"gpu_type": "h100"})
    assert assess(queue(local_only, other_labels), Requests(), set(), offer()).new_workers == 0


def test_a_job_no_new_worker_could_take_says_why_and_asks_for_nothing() -> None:
    demand = assess(queue(job(1, gpus=4), job(2, estimated_runtime=7200), job(3)),
                    Requests(), set(), offer(gpus=2, budget=3600))
    assert demand.for_jobs == [], "job 3 has no known runtime: it fits no budget either"
    assert "have 2 GPUs" in demand.notes["j1"].detail
    assert "the job needs 7200s" in demand.notes["j2"].detail
    assert "unknown time" in demand.notes["j3"].detail
    fits = assess(queue(job(4, max_runtime=600)), Requests(), set(), offer(budget=3600))
    assert fits.for_jobs == ["j4"]


def test_after_a_failure_no_request_is_made_and_the_jobs_say_why() -> None:
    backoff = ev.Reason("no_worker", "slurm: sbatch failed; asking again in 5s")
    demand = assess(queue(job(1)), Requests(), set(), offer(), held=backoff)
    assert demand.new_workers == 0 and demand.notes["j1"] == backoff


# --- what Slurm says -----------------------------------------------------------------------


def test_squeue_lines_become_each_tasks_state() -> None:
    text = "\n".join([
        "eventq-r1|12|0|RUNNING|None|node7",
        "eventq-r1|12|1|PENDING|Resources|",
        "eventq-r2|15|N/A|CANCELLED|None|",  # the array's own record: tasks never started
        "someone-else|16|0|RUNNING|None|node1",
        "eventq-r3|17|0|COMPLETING|None|node2",
    ])
    seen = sightings(text, "eventq")
    assert set(seen) == {"r1", "r2", "r3"}
    assert seen["r1"].tasks == {0: Observed("running", "", "node7"),
                                1: Observed("pending", "Resources")}
    assert seen["r2"].others == Observed("ended", "CANCELLED")
    assert seen["r3"].tasks[0] == Observed("running", "completing", "node2"), \
        "a completing job may still have processes: not ended yet"


def test_only_changes_are_recorded_and_a_task_slurm_forgot_has_ended() -> None:
    log = Log()
    requests = asked(log, "r1", 3)
    seen = {"r1": Sighting("12", {0: Observed("running", "", "node7"),
                                  1: Observed("pending", "queued")})}
    changes = observed_changes(list(requests.by_id.values()), seen)
    assert [(c.task, c.state, c.detail) for c in changes
            if isinstance(c, ev.RequestedWorkerChanged)] == [
        (0, "running", ""), (1, "pending", "queued"), (2, "ended", "no longer listed")]
    log.add(*changes)
    assert observed_changes(list(requests.by_id.values()), seen) == []
    assert requests.by_worker["w_r10"].state is TaskState.RUNNING


def test_a_request_a_crash_left_without_its_job_id_is_found_by_name_or_given_up() -> None:
    log = Log()
    requests = asked(log, "r1", 1, batch=None)
    found = observed_changes(list(requests.by_id.values()),
                             {"r1": Sighting("44", {0: Observed("pending", "Priority")})})
    assert found[0] == ev.WorkersRequestSubmitted(request_id="r1", batch_id="44")
    lost = observed_changes(list(requests.by_id.values()), {})
    assert isinstance(lost[0], ev.WorkersRequestFailed) and len(lost) == 1


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("4:00:00", 14400), ("2-12", 216000),
    ("1-00:30:00", 88200), ("UNLIMITED", None), ("365-00:00:00", None), ("NONE", None)])
def test_slurm_times(text: str, seconds: float | None) -> None:
    assert parse_time(text) == seconds


def test_gres_and_partition_limits() -> None:
    assert parse_gres("gpu:a100:2") == ("a100", 2)
    assert parse_gres("gpu:2") == (None, 2)
    assert parse_gres("gpu") == (None, 1)
    with pytest.raises(SlurmSettingsError, match="gpu"):
        parse_gres("mps:100")
    assert partition_limit("PartitionName=debug DefaultTime=NONE MaxTime=2:00:00") == 7200
    assert partition_limit("PartitionName=debug DefaultTime=NONE MaxTime=UNLIMITED") is None


@pytest.mark.parametrize(("settings", "flag"), [
    (SlurmSettings("debug", max_workers=0), "--slurm-max-workers"),
    (SlurmSettings("debug", time="soon"), "--slurm-time"),
    (SlurmSettings("debug", time="1", margin=60), "--slurm-margin-time"),
    (SlurmSettings("debug", job_name="two words"), "--slurm-job-name"),
])
def test_settings_slurm_would_refuse_name_their_flag(settings: SlurmSettings,
                                                     flag: str) -> None:
    with pytest.raises(SlurmSettingsError, match=flag):
        settings.check()


def test_each_task_of_an_array_has_its_own_token() -> None:
    secret = "wa_secret"
    tokens = {task_token(secret, i) for i in range(100)}
    assert len(tokens) == 100 and all(t.startswith("wt_") for t in tokens)
    assert task_token(secret, 3) == task_token(secret, 3)
    assert task_token("wa_other", 3) != task_token(secret, 3)


@pytest.mark.parametrize(("flags", "said"), [
    (["--slurm-gres", "mps:100"], "--slurm-gres 'mps:100' must read gpu"),
    (["--slurm-time", "1", "--slurm-margin-time", "60"], "leaves nothing past"),
    (["--slurm-worker-gpus", "lots"], "cannot read GPU spec"),
    (["--slurm-extra=--qos='unclosed"], "quotation"),
])
def test_slurm_flags_slurm_would_refuse_stop_the_server_before_it_starts(
        tmp_path: Path, flags: list[str], said: str) -> None:
    done = subprocess.run([*server_argv(tmp_path / "data"), "--slurm-partition", "debug",
                           *flags], capture_output=True, text=True, timeout=60,
                          env=clean_env(), check=False)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not (tmp_path / "data").exists(), "nothing was written"


def test_a_worker_lost_is_no_worker_to_wait_for() -> None:
    log = Log()
    requests = asked(log, "r1", 1)
    log.add(ev.RequestedWorkerChanged(request_id="r1", task=0, state="running", node="n7"))
    assert assess(queue(job(1)), requests, set(), offer()).new_workers == 0, \
        "started, its worker about to connect"
    replaced = assess(queue(job(1)), requests, {"w_r10"}, offer())
    assert replaced.new_workers == 1, "its worker came and went: the job needs another"
    assert assess(queue(job(1)), requests, {"w_r10"}, offer(max_workers=1)).new_workers == 0, \
        "while Slurm still holds its task, it counts toward the cap"


def test_a_finished_task_s_output_goes_and_only_the_latest_failed_ones_stay(
        tmp_path: Path) -> None:
    provider = SlurmProvider(SlurmSettings("debug"), tmp_path)
    provider.output_dir.mkdir()
    names = [f"7_{i}.out" for i in range(KEEP_FAILED + 3)]
    for age, name in enumerate(names):
        (provider.output_dir / name).write_text("worker output\n")
        os.utime(provider.output_dir / name, (1000 + age, 1000 + age))
    provider.discard_output("7", 0, failed=False)
    assert not (provider.output_dir / "7_0.out").exists()
    for i in range(1, KEEP_FAILED + 3):
        provider.discard_output("7", i, failed=True)
    kept = sorted(f.name for f in (provider.output_dir / FAILED_DIR).iterdir())
    assert kept == sorted(names[3:]), "the latest failed tasks' output stays, the rest goes"
    assert not list(provider.output_dir.glob("*.out"))
    provider.discard_output("7", 99, failed=False)  # already gone: nothing to do


# --- when the provisioner looks ----------------------------------------------------------


class Looks(Provisioner):
    """The provisioner's own timing of its reviews, with the reviews themselves recorded."""

    def __init__(self, clock: SimClock) -> None:
        provider = SimpleNamespace(offer=offer())
        super().__init__(None, Requests(), None, None, None, provider,  # type: ignore[arg-type]
                         clock, idle_timeout=60, url="http://eventq")
        self.reviews: list[float] = []

    def tell(self, message: Any) -> None:
        self.reviews.append(self.clock.now())


def submitted(n: int, at: float, **spec: Any) -> Record:
    return Record(n, at, "alice", ev.JobSubmitted(job=job(n, **spec).spec), b"")


def test_the_first_job_a_new_worker_could_take_is_looked_at_without_waiting_out_the_gap(
) -> None:
    clock = SimClock(NOW)
    looks = Looks(clock)
    looks.on_durable([submitted(1, NOW)])  # an earlier look (a change of limits, say)
    clock.advance(0)
    looks._review_due, looks._last_review = None, clock.now()  # as the review itself does
    clock.advance(0.05)
    looks.on_durable([submitted(2, clock.now(), target="local"), submitted(3, clock.now())])
    clock.advance(0)
    assert looks.reviews == [NOW, NOW + 0.05]  # not at NOW + REVIEW_GAP
    clock.advance(REVIEW_GAP)
    assert looks.reviews == [NOW, NOW + 0.05]  # the look the gap had planned does not follow


def test_while_the_provider_serves_jobs_or_none_it_could_take_looks_wait_out_the_gap(
) -> None:
    clock = SimClock(NOW)
    looks = Looks(clock)
    looks._last_review = NOW
    looks.on_durable([submitted(1, NOW, target="local"), submitted(2, NOW, gpus=2)])
    clock.advance(0.05)
    assert looks.reviews == []
    clock.advance(REVIEW_GAP)
    assert looks.reviews == [NOW + REVIEW_GAP]
    last = clock.now()
    looks._review_due, looks._last_review = None, last
    looks.notes = {"j2": ev.Reason("no_worker", "slurm: asking for a worker")}
    looks.on_durable([submitted(3, clock.now())])
    clock.advance(0.05)
    assert looks.reviews == [NOW + REVIEW_GAP]
    clock.advance(REVIEW_GAP)
    assert looks.reviews == [NOW + REVIEW_GAP, last + REVIEW_GAP]
