"""The web page in a real browser, against a real ``eventq server`` with simulated GPUs.

Each test is a user's story: what they do on the page (found by role and name, as a screen
reader finds it) or from the CLI, and what the page then shows without a reload. One server
and one browser serve the whole module (the stories leave each other's jobs alone by their
names); every view is checked by axe and saved as a screenshot in ``screenshots/``.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser import launch, playwright_or_skip, serious_findings, shoot
from tests.cluster import EVENTQ, Cluster, Server, Worker, clean_env, wait_for

pytestmark = pytest.mark.slow
#: How long the page may take to show what a story waits for.
SHOWN_MS = 15_000


@pytest.fixture(scope="module")
def sync_api() -> Any:
    return playwright_or_skip()


@pytest.fixture(scope="module")
def ui_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("ui"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def server(ui_cluster: Cluster, sync_api: Any) -> Server:
    """Two simulated local GPUs; limits roomy enough that only GPUs hold jobs back."""
    srv = ui_cluster.server(heartbeat_timeout=30.0, args=("--gpus", "2xA100-80GB"))
    srv.call("POST", "/api/queue/concurrency", {
        "max_concurrent": 20, "user_max_concurrent": 20, "local_job_max_concurrent": 20})
    return srv


@pytest.fixture(scope="module")
def browser(sync_api: Any) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        sync_api.expect.set_options(timeout=SHOWN_MS)
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser: Any, server: Server) -> Any:
    context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.set_default_timeout(SHOWN_MS)
    return page


def sign_in(page: Any, token: str) -> None:
    page.goto("/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    from playwright.sync_api import expect
    expect(page.get_by_role("status")).to_have_text("Live")


@pytest.fixture(scope="module")
def admin(browser: Any, server: Server) -> Iterator[Any]:
    """The admin's page, signed in with the admin's token, reused by the stories."""
    page = new_page(browser, server)
    try:
        sign_in(page, server.token)
        yield page
    finally:
        page.context.close()


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(target)


def view(page: Any, hash_: str, heading: str) -> None:
    """Open a view by its link (as a user would) or its URL, and wait for its heading."""
    page.evaluate("hash => { location.hash = hash; }", hash_)
    expect(page.get_by_role("heading", name=heading, level=1)).to_be_visible()


def accessible(page: Any, name: str) -> None:
    """No critical or serious axe finding, and a screenshot for the record."""
    shoot(page, name)
    assert serious_findings(page) == []


def submit(server: Server, name: str, command: str, gpus: int = 1, token: str | None = None,
           **more: Any) -> str:
    """What a user types: ``eventq jobs submit`` (the CLI, against the server's data dir)."""
    extra = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in more.items()]
    done = subprocess.run(
        [EVENTQ, "jobs", "submit", "--url", server.url, "--token", token or server.token,
         "--name", name,
         "--gpus", str(gpus), "--target", "local", "--no-export-env", "--format", "json", *extra,
         "--", "sh", "-c",
         command], capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    job_id: str = json.loads(done.stdout)["job_id"]
    return job_id


def row(page: Any, name: str) -> Any:
    return page.get_by_role("table", name="Jobs").get_by_role("row").filter(
        has=page.get_by_role("link", name=name, exact=True))


def cancel_all(server: Server) -> None:
    """Free both local GPUs for the next story."""
    server.call("POST", "/api/queue/cancel",
                {"status": ["pending", "running", "blocked", "held", "waiting"]})
    wait_for(lambda: server.call("GET", "/api/queue/stats")["local"]["running_jobs"] == 0,
             "the local GPUs to free")


# --- sign-in ------------------------------------------------------------------------------


def test_the_page_asks_for_a_token_and_a_bad_one_is_refused_in_words(
        browser: Any, server: Server) -> None:
    page = new_page(browser, server)
    try:
        page.goto("/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        accessible(page, "sign-in")
        page.get_by_label("API token").fill("eq_not-a-token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not valid")
        assert page.context.cookies() == [] or all(
            c["name"] != "eventq_session" for c in page.context.cookies())
    finally:
        page.context.close()


def test_eventq_ui_prints_a_link_that_signs_the_admin_in_once(
        browser: Any, server: Server) -> None:
    done = subprocess.run([EVENTQ, "ui", "--data-dir", str(server.data)], capture_output=True,
                          text=True, env=clean_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(f"{server.url}/#signin=")
    page = new_page(browser, server)
    try:
        page.goto(link)
        expect(page.get_by_role("status")).to_have_text("Live")
        expect(page.get_by_text("admin (admin)")).to_be_visible()
        assert "signin" not in page.url, "the code stays out of the address bar and history"
        cookie = next(c for c in page.context.cookies() if c["name"] == "eventq_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        page.goto(link)  # used once: refused the second time
        expect(page.get_by_text("already used or has expired")).to_be_visible()
    finally:
        page.context.close()


# --- queue and jobs -----------------------------------------------------------------------


def test_the_queue_panel_shows_counts_and_admin_controls(admin: Any, server: Server) -> None:
    view(admin, "#/queue", "Queue")
    expect(admin.get_by_role("button", name="Save limits")).to_be_visible()
    expect(admin.get_by_role("button", name="Process queue")).to_be_visible()
    server.call("POST", "/api/queue/submit", {"command": ["true"], "name": "needs-approval",
                                              "requires_approval": True})
    approvals = admin.get_by_role("table", name="Waiting for approval")
    expect(approvals.get_by_role("link", name=re.compile("needs-approval"))).to_be_visible()
    admin.get_by_role("button", name=re.compile("^Reject needs-approval")).click()
    expect(admin.get_by_text("A reason is required to reject.")).to_be_visible()
    admin.get_by_label(re.compile("^Reason for rejecting needs-approval")).fill("over budget")
    admin.get_by_role("button", name=re.compile("^Reject needs-approval")).click()
    expect(admin.get_by_text("No job waits for approval.")).to_be_visible()
    accessible(admin, "queue")


def test_the_admin_approves_saves_limits_processes_the_queue_and_cleans_up(
        admin: Any, server: Server) -> None:
    view(admin, "#/queue", "Queue")
    job_id = server.call("POST", "/api/queue/submit", {
        "command": ["true"], "name": "to-approve", "requires_approval": True})["job_id"]
    approvals = admin.get_by_role("table", name="Waiting for approval")
    expect(approvals.get_by_role("link", name=re.compile("to-approve"))).to_be_visible()
    admin.get_by_role("button", name=re.compile("^Approve to-approve")).click()
    expect(admin.get_by_text("No job waits for approval.")).to_be_visible()
    wait_for(lambda: server.job(job_id)["status"] == "completed", "the approved job to run")
    admin.get_by_label("Max concurrent").fill("19")
    admin.get_by_role("button", name="Save limits").click()
    wait_for(lambda: server.call("GET", "/api/queue/concurrency")["max_concurrent"] == 19,
             "the limit to be saved")
    expect(admin.get_by_role("definition").filter(has_text=re.compile("^19$"))).to_have_count(1)
    admin.get_by_role("button", name="Process queue").click()
    expect(admin.get_by_text(re.compile(r"^Scheduling pass done: \d+ started\.$"))) \
        .to_be_visible()
    days = admin.get_by_label("Finished more than (days)")
    days.fill("0")
    admin.get_by_role("button", name="Clean up").click()
    expect(admin.get_by_text("days must be between 1 and 365")).to_be_visible()
    days.fill("1")
    admin.get_by_role("button", name="Clean up").click()
    expect(admin.get_by_text("Cleaned up 0 jobs.")).to_be_visible()
    assert server.job(job_id)["status"] == "completed", "a job of today is kept"
    server.call("POST", "/api/queue/concurrency", {"max_concurrent": 20})


def test_a_job_submitted_from_the_cli_appears_without_a_reload(
        admin: Any, server: Server) -> None:
    view(admin, "#/jobs", "Jobs")
    marker = admin.evaluate("() => { window.sameDocument = true; return true; }")
    submit(server, "cli-row", "true")
    expect(row(admin, "cli-row")).to_have_count(1)
    assert admin.evaluate("() => window.sameDocument") is marker, "the page was reloaded"


def test_a_waiting_job_says_why_in_words_and_starts_live_when_another_is_cancelled(
        admin: Any, server: Server) -> None:
    cancel_all(server)
    view(admin, "#/jobs", "Jobs")
    submit(server, "hog-a", "sleep 300", max_runtime=600)
    submit(server, "hog-b", "sleep 300")
    expect(row(admin, "hog-b")).to_contain_text("running")
    submit(server, "waiter", "sleep 300")
    waiter = row(admin, "waiter")
    expect(waiter).to_contain_text("waits for GPUs")
    expect(waiter).to_contain_text("pending")
    # A limit that falls on another day is shown with its date first (the ten minutes
    # before midnight, here).
    expect(waiter).to_contain_text(re.compile(
        r"starts after job hog-a ends, its time limit is (\S+ )?\d\d:\d\d"))
    submit(server, "after-waiter", "true")
    unknown = re.compile(r"no estimate: job (hog-b|waiter)[^;]* has no time limit")
    expect(row(admin, "after-waiter")).to_contain_text(unknown)
    accessible(admin, "jobs")
    row(admin, "after-waiter").get_by_role("link", name="after-waiter").click()
    expect(admin.get_by_role("heading", name=re.compile("^after-waiter"), level=1)).to_be_visible()
    expect(admin.get_by_role("definition").filter(has_text="no estimate: job")).to_contain_text(
        "has no time limit")
    view(admin, "#/queue", "Queue")
    expect(admin.get_by_role("table", name="Open jobs by user")).to_contain_text("admin")
    shoot(admin, "queue-busy")
    view(admin, "#/jobs", "Jobs")
    admin.get_by_role("button", name=re.compile("^Cancel hog-a")).click()
    expect(row(admin, "hog-a")).to_contain_text("cancelled")
    expect(waiter).to_contain_text("running")
    expect(row(admin, "after-waiter")).to_contain_text(unknown)


def test_row_actions_hold_release_priority_cancel_retry_and_bulk_cancel(
        admin: Any, server: Server) -> None:
    cancel_all(server)
    for name in ("busy-a", "busy-b"):
        submit(server, name, "sleep 300")
    ids = {name: submit(server, name, "true") for name in ("acted-on", "picked-1", "picked-2")}
    view(admin, "#/jobs?name=acted-on", "Jobs")
    acted = row(admin, "acted-on")
    expect(acted).to_contain_text("pending")
    acted.get_by_role("button", name=re.compile("^Hold acted-on")).click()
    expect(acted).to_contain_text("held")
    acted.get_by_role("button", name=re.compile("^Release acted-on")).click()
    expect(acted).to_contain_text("pending")
    acted.get_by_role("button", name=re.compile("^Priority acted-on")).click()
    dialog = admin.get_by_role("dialog", name=re.compile("^Priority of acted-on"))
    accessible(admin, "priority-dialog")
    dialog.get_by_label(re.compile("^New priority")).fill("25")
    dialog.get_by_role("button", name="Set priority").click()
    expect(dialog).to_be_hidden()
    expect(acted.get_by_role("cell").nth(6)).to_have_text("25")
    assert server.job(ids["acted-on"])["priority"] == 25
    acted.get_by_role("button", name=re.compile("^Cancel acted-on")).click()
    expect(acted).to_contain_text("cancelled")
    acted.get_by_role("button", name=re.compile("^Retry acted-on")).click()
    expect(acted).to_contain_text("pending")
    view(admin, "#/jobs?name=picked-", "Jobs")
    for name in ("picked-1", "picked-2"):
        row(admin, name).get_by_role("checkbox", name=re.compile(f"^Select {name}")).check()
    admin.get_by_role("button", name="Cancel selected (2)").click()
    expect(admin.get_by_role("main").get_by_text("Cancelled 2 jobs.")).to_be_visible()
    for name in ("picked-1", "picked-2"):
        expect(row(admin, name)).to_contain_text("cancelled")
        assert server.job(ids[name])["status"] == "cancelled"
    assert server.job(ids["acted-on"])["status"] == "pending", "bulk cancel took only those"
    cancel_all(server)


def test_filters_and_sort_are_kept_in_the_url_a_shared_link_shows_the_same_rows(
        browser: Any, admin: Any, server: Server) -> None:
    for name, gpus in (("url-a1", 1), ("url-a2", 2)):
        server.call("POST", "/api/queue/submit", {"command": ["true"], "name": name, "gpus": gpus,
                                                  "target": "worker",
                                                  "worker_labels": {"pool": "none"}})
    view(admin, "#/jobs", "Jobs")
    search = admin.get_by_role("search", name="Filter jobs")
    search.get_by_label("Name").fill("url-a")
    search.get_by_label("Status").select_option("pending")
    search.get_by_role("button", name="Filter").click()
    expect(admin.get_by_text("2 jobs", exact=True)).to_be_visible()
    assert urlsplit(admin.url).fragment == "/jobs?status=pending&name=url-a"
    table = admin.get_by_role("table", name="Jobs")
    table.get_by_role("button", name="GPUs").click()
    expect(table.get_by_role("columnheader", name="GPUs")).to_have_attribute(
        "aria-sort", "descending")
    table.get_by_role("button", name="GPUs").click()
    expect(table.get_by_role("columnheader", name="GPUs")).to_have_attribute(
        "aria-sort", "ascending")
    shared = admin.url
    assert "sort=gpus&order=asc" in shared
    page = new_page(browser, server)
    try:
        sign_in(page, server.token)
        page.goto(shared)
        expect(page.get_by_text("2 jobs", exact=True)).to_be_visible()
        expect(page.get_by_label("Name")).to_have_value("url-a")
        expect(page.get_by_label("Status")).to_have_value("pending")
        names = page.get_by_role("table", name="Jobs").get_by_role("link")
        expect(names).to_have_text(["url-a1", "url-a2"])
    finally:
        page.context.close()
    server.call("POST", "/api/queue/cancel", {"status": ["pending"], "user": "admin"})


def test_a_researcher_sees_their_own_jobs_by_default_and_everyone_s_on_asking(
        browser: Any, server: Server) -> None:
    made = server.call("POST", "/api/admin/users", {"name": "rita", "level": "researcher"})
    submit(server, "ritas-job", "exit 1", gpus=0, token=made["token"], max_attempts=1)
    submit(server, "admins-job", "true", gpus=0)
    page = new_page(browser, server)
    try:
        sign_in(page, made["token"])
        view(page, "#/jobs", "Jobs")
        expect(page.get_by_label("User")).to_have_value("rita")
        expect(row(page, "ritas-job")).to_have_count(1)
        expect(row(page, "admins-job")).to_have_count(0)
        assert urlsplit(page.url).fragment == "/jobs", "mine is the default, not in the URL"
        page.get_by_label("User").fill("")
        page.get_by_role("button", name="Filter").click()
        expect(row(page, "admins-job")).to_have_count(1)
        assert urlsplit(page.url).fragment == "/jobs?user="
        expect(row(page, "admins-job").get_by_role("button")).to_have_count(0)
        expect(row(page, "ritas-job").get_by_role("button", name=re.compile("^Retry"))) \
            .to_have_count(1)
        accessible(page, "researcher-jobs")
    finally:
        page.context.close()


def test_thousands_of_jobs_keep_only_the_rows_in_view_in_the_page(
        admin: Any, server: Server) -> None:
    jobs = [{"command": ["true"], "name": f"bulk-{i:04d}", "target": "worker",
             "worker_labels": {"pool": "none"}} for i in range(3000)]
    server.call("POST", "/api/queue/batch", {"jobs": jobs})
    view(admin, "#/jobs?name=bulk-", "Jobs")
    expect(admin.get_by_text("3000 jobs")).to_be_visible()
    table = admin.get_by_role("table", name="Jobs")
    expect(table.get_by_role("link", name="bulk-2999")).to_be_visible()
    assert table.get_by_role("row").count() < 60
    scroller = admin.get_by_role("region", name="Jobs, scrollable")
    scroller.evaluate("el => { el.scrollTop = el.scrollHeight; }")
    expect(table.get_by_role("link", name="bulk-0000")).to_be_visible()
    assert table.get_by_role("row").count() < 60
    assert table.get_attribute("aria-rowcount") == "3001"
    server.call("POST", "/api/queue/cancel", {"status": ["pending"], "user": "admin"})


def test_the_job_page_tells_how_long_it_waited_and_why(admin: Any, server: Server) -> None:
    view(admin, "#/jobs?name=waiter", "Jobs")
    row(admin, "waiter").get_by_role("link", name="waiter").click()
    expect(admin.get_by_role("heading", name=re.compile("^waiter"), level=1)).to_be_visible()
    history = admin.get_by_role("table", name="Reason history")
    expect(history).to_contain_text("GPU")
    expect(history.get_by_role("row")).not_to_have_count(1)
    timeline = admin.get_by_role("table", name="Timeline")
    expect(timeline).to_contain_text("attempt 1 sent to local")
    expect(admin.get_by_role("definition").filter(has_text="sh -c sleep 300")).to_have_count(1)
    accessible(admin, "job")


def test_logs_follow_live(admin: Any, server: Server, tmp_path: Path) -> None:
    cancel_all(server)
    go = tmp_path / "go"
    job_id = submit(server, "talker", f"echo first; echo oops >&2; "
                                      f"while [ ! -e {go} ]; do sleep 0.05; done; echo second")
    view(admin, f"#/job/{job_id}", re.compile("^talker"))
    stdout = admin.get_by_role("log", name="stdout")
    expect(stdout).to_contain_text("first")
    expect(admin.get_by_role("log", name="stderr")).to_contain_text("oops")
    go.touch()
    expect(stdout).to_contain_text("second")
    expect(admin.get_by_text(re.compile("Attempt 1 ended: completed, exit code 0"))).to_be_visible()


def test_the_logs_of_each_attempt_are_chosen_by_attempt(
        admin: Any, server: Server, tmp_path: Path) -> None:
    cancel_all(server)
    mark = tmp_path / "tried"
    job_id = submit(server, "twice", f"if [ -e {mark} ]; then echo second-out; "
                                     f"echo second-err >&2; else touch {mark}; echo first-out; "
                                     f"echo first-err >&2; exit 3; fi", max_attempts=2,
                    retry_on_failure=True)
    wait_for(lambda: server.job(job_id)["status"] == "completed", "the second attempt")
    view(admin, f"#/job/{job_id}", re.compile("^twice"))
    stdout, stderr = (admin.get_by_role("log", name=n) for n in ("stdout", "stderr"))
    expect(stdout).to_contain_text("second-out")
    expect(stderr).to_contain_text("second-err")
    admin.get_by_label("Attempt", exact=True).select_option("1")
    expect(stdout).to_have_text("first-out\n")
    expect(stderr).to_have_text("first-err\n")
    expect(admin.get_by_text(
        "Attempt 1 ended, exit code 3; the job went on to attempt 2.")).to_be_visible()
    accessible(admin, "job-logs")


# --- workers ------------------------------------------------------------------------------


def test_add_a_worker_copy_its_command_and_see_it_go_idle_then_busy(
        admin: Any, server: Server, ui_cluster: Cluster) -> None:
    view(admin, "#/workers", "Workers")
    admin.get_by_label("Name", exact=True).fill("gpu-box-1")
    admin.get_by_role("button", name="Add worker").click()
    expect(admin.get_by_role("heading", name="Worker gpu-box-1 added")).to_be_visible()
    admin.get_by_role("button", name="Copy eventq worker command").click()
    expect(admin.get_by_text("Copied.")).to_be_visible()
    command = shlex.split(admin.evaluate("() => navigator.clipboard.readText()"))
    assert command[:2] == ["eventq", "worker"]
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    admin.get_by_role("button", name="Copy SimpleTuner worker command").click()
    stock = shlex.split(admin.evaluate("() => navigator.clipboard.readText()"))
    assert stock[-2:] == ["simpletuner", "worker"], stock
    assert dict(word.split("=", 1) for word in stock[:-2]) == {
        "SIMPLETUNER_ORCHESTRATOR_URL": flags["--url"],
        "SIMPLETUNER_WORKER_TOKEN": flags["--token"], "SIMPLETUNER_WORKER_NAME": "gpu-box-1",
        "SIMPLETUNER_WORKER_PERSISTENT": "true"}
    worker = start_worker(server, ui_cluster, flags)
    workers = admin.get_by_role("table", name="Every worker")
    box = workers.get_by_role("row").filter(has_text="gpu-box-1")
    expect(box).to_contain_text("idle")
    expect(box.get_by_role("cell").nth(4)).to_have_text(re.compile(r"\d\d:\d\d"))  # last seen
    accessible(admin, "workers")
    server.call("POST", "/api/queue/submit", {"command": ["sleep", "300"], "name": "remote",
                                              "target": "worker"})
    expect(box).to_contain_text("busy")
    expect(box.get_by_role("link")).to_have_count(1)
    box.get_by_role("button", name="Drain gpu-box-1").click()
    expect(box).to_contain_text("draining")
    rotate_from_the_page(admin, server, worker)


def test_a_worker_never_started_is_removed_from_the_page(admin: Any, server: Server) -> None:
    view(admin, "#/workers", "Workers")
    admin.get_by_label("Name", exact=True).fill("never-started")
    admin.get_by_role("button", name="Add worker").click()
    expect(admin.get_by_role("heading", name="Worker never-started added")).to_be_visible()
    admin.get_by_role("button", name="Done, hide the token").click()
    expect(admin.get_by_role("heading", name="Worker never-started added")).to_have_count(0)
    workers = admin.get_by_role("table", name="Every worker")
    spare = workers.get_by_role("row").filter(has_text="never-started")
    expect(spare).to_contain_text("connecting")
    cards = {admin.get_by_role("term").nth(i).text_content(): int(
        admin.get_by_role("definition").nth(i).text_content() or 0)
        for i in range(admin.get_by_role("term").count())}
    assert cards["Total"] == sum(v for k, v in cards.items() if k != "Total"), cards
    assert cards["Connecting"] >= 1, cards
    admin.once("dialog", lambda dialog: dialog.accept())
    spare.get_by_role("button", name="Remove never-started").click()
    expect(spare).to_have_count(0)
    assert all(w["name"] != "never-started"
               for w in server.call("GET", "/api/admin/workers")["workers"])


def start_worker(server: Server, cluster: Cluster, flags: dict[str, str]) -> Worker:
    """``eventq worker`` with the URL, token and name the page's command gave."""
    created = {"worker_id": "gpu-box-1", "token": flags["--token"]}
    worker = Worker(server, cluster.root / "gpu-box-1", created, url=flags["--url"])
    cluster.workers.append(worker)
    worker.start("--name", flags["--name"], "--persistent", "--gpus", "1xA100-80GB")
    return worker


def rotate_from_the_page(admin: Any, server: Server, worker: Worker) -> None:
    old = worker.token
    box = admin.get_by_role("table", name="Every worker").get_by_role("row").filter(
        has_text="gpu-box-1")
    box.get_by_role("button", name="Rotate token gpu-box-1").click()
    expect(admin.get_by_role("heading", name="New token for gpu-box-1")).to_be_visible()
    admin.get_by_role("button", name="Copy eventq worker command").click()
    shown = shlex.split(admin.evaluate("() => navigator.clipboard.readText()"))
    new = shown[shown.index("--token") + 1]
    assert new != old
    assert register(server, old) == 401, "the old token still opens the worker routes"
    assert register(server, new) == 200


def register(server: Server, token: str) -> int:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("POST", "/api/workers/register", body=json.dumps({
            "name": "gpu-box-1", "gpu_info": {"name": "A100", "vram_gb": 80, "count": 1,
                                              "accelerator": "cuda"}, "persistent": True}),
            headers={"X-Worker-Token": token, "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# --- GPUs over time and replay ------------------------------------------------------------


def test_the_gantt_shows_two_jobs_on_disjoint_gpus(admin: Any, server: Server) -> None:
    cancel_all(server)
    submit(server, "left", "sleep 300")
    submit(server, "right", "sleep 300")
    wait_for(lambda: server.call("GET", "/api/queue/stats")["local"]["running_jobs"] == 2,
             "both to run")
    view(admin, "#/gpus", "GPUs over time")
    chart = admin.get_by_role("group", name=re.compile("^GPUs over time"))
    expect(chart.get_by_role("link", name=re.compile("^Job left attempt 1"))).to_be_visible()
    expect(chart.get_by_role("link", name=re.compile("^Job right attempt 1"))).to_be_visible()
    table = admin.get_by_role("table", name=re.compile("every attempt that held a GPU"))
    gpus = {}
    for name in ("left", "right"):
        line = table.get_by_role("row").filter(has=admin.get_by_role("link", name=name))
        expect(line).to_contain_text("now")
        gpus[name] = line.get_by_role("cell").nth(1).text_content()
    assert gpus["left"] != gpus["right"], gpus
    chart.get_by_role("link", name=re.compile("^Job left attempt 1")).focus()
    expect(chart).to_have_accessible_description(
        re.compile("^left attempt 1 by admin, on local GPU"))
    chart.get_by_role("link", name=re.compile("^Job right attempt 1")).hover()
    expect(chart).to_have_accessible_description(
        re.compile("^right attempt 1 by admin, on local GPU"))
    expect(chart.get_by_text("now", exact=True)).to_be_visible()
    accessible(admin, "gpus")
    view(admin, "#/gpus?window=600", "GPUs over time")
    expect(chart.get_by_role("link", name=re.compile("^Job right attempt 1"))).to_be_visible()
    shoot(admin, "gpus-10-minutes")
    admin.get_by_label("Show").select_option(label="Last 6 hours")
    admin.get_by_label("Colour by").select_option("priority")
    expect(admin).to_have_url(re.compile(r"#/gpus\?window=21600&by=priority$"))
    admin.reload()
    expect(admin.get_by_label("Show")).to_have_value("21600")
    expect(admin.get_by_label("Colour by")).to_have_value("priority")
    chart.get_by_role("link", name=re.compile("^Job left attempt 1")).click()
    expect(admin.get_by_role("heading", name=re.compile("^left"), level=1)).to_be_visible()


def test_the_scrubber_moved_back_shows_a_finished_job_as_running(
        admin: Any, server: Server) -> None:
    cancel_all(server)
    job_id = submit(server, "finisher", "sleep 0.2")
    wait_for(lambda: server.job(job_id)["status"] == "completed", "finisher to complete")
    started = next(e["seq"] for e in server.call("GET", f"/api/jobs/{job_id}/events")["events"]
                   if e["type"] == "attempt_started")
    view(admin, "#/replay", "Replay")
    jobs = admin.get_by_role("table", name="Jobs at this event")
    expect(jobs.get_by_role("row").filter(has_text="finisher")).to_contain_text("completed")
    admin.get_by_role("slider", name="Event").fill(str(started))
    expect(admin.get_by_text(f"As of event {started},")).to_be_visible()
    expect(jobs.get_by_role("row").filter(has_text="finisher")).to_contain_text("running")
    admin.get_by_role("button", name="Next event").click()
    expect(admin.get_by_text(f"As of event {started + 1},")).to_be_visible()
    admin.get_by_role("button", name="Previous event").click()
    expect(admin.get_by_text(f"As of event {started},")).to_be_visible()
    expect(jobs.get_by_role("row").filter(has_text="finisher")).to_contain_text("running")
    accessible(admin, "replay")
    ended = server.job(job_id)["completed_at"]
    local = admin.evaluate("t => { const d = new Date(t * 1000 + 1000);"
                           " d.setMinutes(d.getMinutes() - d.getTimezoneOffset());"
                           " return d.toISOString().slice(0, 19); }", ended)
    admin.get_by_label("Time", exact=True).fill(local)
    admin.get_by_role("button", name="Go to time").click()
    expect(jobs.get_by_role("row").filter(has_text="finisher")).to_contain_text("completed")


# --- who may do what, and the stream ------------------------------------------------------


def test_a_viewer_sees_no_admin_control_and_a_forged_post_is_refused(
        browser: Any, admin: Any, server: Server) -> None:
    made = server.call("POST", "/api/admin/users", {"name": "vera", "level": "viewer"})
    page = new_page(browser, server)
    try:
        sign_in(page, made["token"])
        expect(page.get_by_text("vera (viewer)")).to_be_visible()
        expect(page.get_by_role("navigation").get_by_role("link", name="Workers")).to_have_count(0)
        view(page, "#/queue", "Queue")
        expect(page.get_by_role("table", name="Jobs by status")).to_be_visible()
        for control in ("Save limits", "Process queue", "Clean up"):
            expect(page.get_by_role("button", name=control)).to_have_count(0)
        view(page, "#/jobs?user=", "Jobs")
        expect(page.get_by_role("table", name="Jobs").get_by_role("row")).not_to_have_count(1)
        expect(page.get_by_role("button", name=re.compile("^(Cancel|Hold|Retry|Priority) "))) \
            .to_have_count(0)
        accessible(page, "viewer-jobs")
    finally:
        page.context.close()
    job_id = server.call("POST", "/api/queue/submit", {"command": ["true"], "name": "kept",
                                                       "requires_approval": True})["job_id"]
    cookie = next(c["value"] for c in admin.context.cookies() if c["name"] == "eventq_session")
    for origin in ("http://evil.example", None):
        status, body = forged(server, f"/api/queue/{job_id}/cancel", cookie, origin)
        assert status == 403 and "Origin" in body["error"], body
    assert server.job(job_id)["status"] == "blocked", "a refused request changed nothing"


@pytest.mark.parametrize(("level", "ending"), [
    ("researcher", ("DELETE", "tokens", None)),
    ("lead", ("PATCH", "", {"level": "researcher"}))], ids=["revoked", "demoted"])
def test_a_session_ends_and_its_stream_closes_when_its_user_is_revoked_or_demoted(
        browser: Any, server: Server, level: str, ending: tuple[str, str, Any]) -> None:
    name = f"leaving-{level}"
    made = server.call("POST", "/api/admin/users", {"name": name, "level": level})
    page = new_page(browser, server)
    try:
        sign_in(page, made["token"])
        view(page, "#/jobs", "Jobs")
        method, tail, body = ending
        server.call(method, f"/api/admin/users/{name}" + (f"/{tail}" if tail else ""), body)
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        expect(page.get_by_text("Your session has ended.")).to_be_visible()
        expect(page.get_by_role("navigation", name="Views")).to_be_hidden()
        assert page.evaluate("() => window.eventq.live") is None, "its stream is closed"
        accessible(page, f"session-ended-{level}")
    finally:
        page.context.close()


def forged(server: Server, path: str, cookie: str, origin: str | None) -> tuple[int, Any]:
    """A POST another site's page could make a browser send: the cookie, a foreign Origin."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    headers = {"Cookie": f"eventq_session={cookie}"}
    if origin:
        headers["Origin"] = origin
    try:
        conn.request("POST", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_dropped_stream_resumes_with_nothing_missed(admin: Any, server: Server) -> None:
    view(admin, "#/jobs", "Jobs")
    admin.context.set_offline(True)
    admin.evaluate("() => window.eventq.live.drop()")
    status = admin.get_by_role("status")
    expect(status).to_contain_text("Reconnecting… as of event")
    names = [f"while-away-{i}" for i in range(3)]
    for name in names:
        server.call("POST", "/api/queue/submit", {"command": ["true"], "name": name})
    head = server.call("GET", "/api/replay/state?at=1")["head_seq"]
    for name in names:
        expect(row(admin, name)).to_have_count(0)
    admin.context.set_offline(False)
    expect(status).to_have_text("Live")
    for name in names:
        expect(row(admin, name)).to_have_count(1)
    wait_for(lambda: admin.evaluate("() => window.eventq.live.lastSeq") >= head,
             "the page to have every event")
    seq = admin.evaluate("() => window.eventq.live.lastSeq")
    expect(admin.get_by_role("banner").get_by_text(f"event {seq}", exact=True)).to_be_visible()
