"""A real Chromium for the page's tests: Debian's, driven by Playwright for Python.

``playwright install`` cannot download browsers on the machines this runs on, so the
browser is the system's ``/usr/bin/chromium`` (``apt-get install chromium``, in .ci/run);
where it or Playwright is missing, the tests that need it skip and say why. Views are found
by role and name, as a screen reader finds them; axe checks each one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("EVENTQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Where the tests leave a screenshot of each view (git-ignored).
SHOTS = Path(__file__).resolve().parent.parent / "screenshots"
#: What axe may find: nothing critical or serious.
BLOCKING = {"critical", "serious"}


def playwright_or_skip() -> Any:
    """The sync Playwright module, or a skip naming what is missing."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return sync_api


def launch(playwright: Any) -> Any:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args)


def serious_findings(page: Any) -> list[str]:
    """axe's critical and serious findings on the page as it is now."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']} ({v['impact']}): {v['help']} at "
            f"{[n['target'] for n in v['nodes']][:3]}"
            for v in results.response["violations"] if v["impact"] in BLOCKING]


def shoot(page: Any, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
