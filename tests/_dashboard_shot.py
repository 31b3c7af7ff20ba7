"""optuna-dashboard on a search's Optuna journal, in headless Chromium (Debian's
/usr/bin/chromium through Playwright): the screenshot of the study's Pareto front in docs/.

    python -m tests._dashboard_shot JOURNAL [--out docs/optuna_dashboard.png]

JOURNAL: the `optuna.journal` a search printed (`optuna study NAME: PATH; view it: ...`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests._browser import CHROMIUM, chromium_missing


@contextlib.contextmanager
def optuna_dashboard(journal: str, timeout: float = 30):
    """optuna-dashboard on 127.0.0.1 over the journal; yields (base URL, study summaries).
    Started in its own session and stopped by that session's PIDs."""
    from tests._search_helpers import child_env, free_port, stop_session

    exe = Path(sys.executable).absolute().with_name("optuna-dashboard")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "--host", "127.0.0.1", "--port", str(port), str(journal)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, studies = time.time() + timeout, None
        while time.time() < deadline and studies is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        if studies is None:
            raise RuntimeError(f"optuna-dashboard did not answer within {timeout:.0f} s")
        yield base, studies
    finally:
        stop_session(proc.pid, grace=5)


def screenshot(journal: str, out: Path, width: int = 1400, height: int = 1000) -> Path:
    from playwright.sync_api import sync_playwright

    why = chromium_missing()
    if why:
        raise RuntimeError(why)
    with optuna_dashboard(journal) as (base, studies), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{base}/dashboard/studies/{studies[0]['study_id']}")
            page.wait_for_selector("text=Pareto Front", timeout=30_000)
            page.wait_for_timeout(3000)  # the plotly charts draw after the data arrives
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("journal")
    ap.add_argument("--out", default="docs/optuna_dashboard.png")
    args = ap.parse_args()
    print(screenshot(args.journal, Path(args.out)))


if __name__ == "__main__":
    main()
