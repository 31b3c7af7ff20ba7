"""Drive the real MLflow UI in headless Chromium (Debian's /usr/bin/chromium through Playwright;
Playwright cannot download its own browsers here), for tests/test_mlflow_ui.py and for the
screenshots under docs/.

    python -m tests._browser [--tracking-uri sqlite:///PATH/mlflow.db --parent RUN_ID] [--out docs]

Without a store it runs a tiny real search first (digits, 4 trials of one epoch) in a temp dir.
Takes: docs/review_runs.png (the runs page from the printed link), docs/review_chart.png (the
chart view, runs coloured by is_pareto), docs/review_description.png (the search's description);
then exports the knee (`coun-tune export --pick knee`, which registers its model) and takes
docs/review_model_registered.png (the knee's model page, registered),
docs/review_models_tab.png and docs/review_models_metrics.png (the Models tab: one model per
trial, its registered version, its metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
PRINTED_LINK = re.compile(r"http://127\.0\.0\.1:5000/(#/experiments/\S+)")


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)"
    return None


def printed_fragment(stdout: str) -> str:
    """The UI route of the link `coun-tune search` / `coun-tune pareto` printed."""
    found = PRINTED_LINK.findall(stdout)
    if not found:
        raise AssertionError(f"no review link printed:\n{stdout[-2000:]}")
    return found[-1]


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, timeout: float = 180):
    """`mlflow server` on 127.0.0.1 over the store, one worker, no job runner; yields its base
    URL. Started in its own session and stopped by that session's PIDs."""
    from tests._search_helpers import child_env, free_port, stop_session

    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(exe) if exe.is_file() else sys.executable,
        *([] if exe.is_file() else ["-m", "mlflow"]),
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd,
        env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=tempfile.gettempdir(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mlflow server did not come up: {log.read().decode(errors='replace')[-2000:]}")
            time.sleep(1)
        yield base
    finally:
        stop_session(proc.pid, grace=10)
        log.close()


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    why = chromium_missing()
    if why:  # fail, saying why: a skipped browser test would hide a broken review
        raise AssertionError(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


def open_page(b, url: str, wait_for: str, timeout_ms: int = 120_000, width: int = 1600, height: int = 1000):
    """A fresh page at `url`, once `wait_for` (a text) is on it; the assistant panel closed."""
    page = b.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.get_by_text(wait_for).first.wait_for(timeout=timeout_ms)
    page.wait_for_timeout(2000)  # let charts, columns and the assistant panel settle
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    for _ in range(3):  # the assistant panel opens itself on first load: close it for the screenshots
        if not (close.count() and close.first.is_visible()):
            break
        with contextlib.suppress(Exception):
            close.first.click(timeout=5000)
        page.wait_for_timeout(1000)
    return page


def image_loaded(page, timeout_ms: int = 60_000) -> bool:
    """An <img> of the artifact viewer with real pixels (naturalWidth > 0)."""
    page.wait_for_function(
        "() => [...document.images].some(i => i.complete && i.naturalWidth > 100)", timeout=timeout_ms
    )
    return True


def take_screenshots(base: str, fragment: str, experiment_id: str, parent_run_id: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with browser() as b:
        page = open_page(b, f"{base}/{fragment}", "is_pareto")
        shots.append(out / "review_runs.png")
        page.screenshot(path=str(shots[-1]))
        page.close()
        page = open_page(b, f"{base}/{fragment}&compareRunsMode=CHART", "Pareto front (coun-tune)")
        shots.append(out / "review_chart.png")
        page.screenshot(path=str(shots[-1]))
        page.close()
        page = open_page(
            b,
            f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}?workflowType=machine_learning",
            "Pareto front",
            height=1400,
        )
        more = page.get_by_text("Show more", exact=True)
        if more.count():
            more.first.click()
        page.get_by_text("Description", exact=True).first.scroll_into_view_if_needed()
        shots.append(out / "review_description.png")
        page.screenshot(path=str(shots[-1]))
        page.close()
    return shots


def model_page(b, base: str, experiment_id: str, model_id: str, model_name: str):
    """The logged model's page (`#/experiments/ID/models/MODEL_ID`), once its name is shown."""
    return open_page(b, f"{base}/#/experiments/{experiment_id}/models/{model_id}", model_name, height=1200)


def models_tab(b, base: str, experiment_id: str, wait_for: str, width: int = 1600):
    """The experiment's Models tab (its logged models, with their metrics as columns)."""
    return open_page(
        b, f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning", wait_for, width=width
    )


_GRID_JS = """() => {
  const key = (id) => id.replaceAll('&quot;', '"');
  const heads = {};
  document.querySelectorAll('.ag-header-cell[col-id]').forEach(h => {
    heads[key(h.getAttribute('col-id'))] = h.innerText.trim();
  });
  const rows = {};
  document.querySelectorAll('.ag-row[row-index]').forEach(r => {
    const i = r.getAttribute('row-index');
    rows[i] = rows[i] || {};
    r.querySelectorAll('.ag-cell[col-id]').forEach(c => {
      rows[i][key(c.getAttribute('col-id'))] = c.innerText.trim();
    });
  });
  const v = document.querySelector('.ag-body-horizontal-scroll-viewport');
  return {heads, rows, left: v ? v.scrollLeft : 0, width: v ? v.scrollWidth : 0, view: v ? v.clientWidth : 0};
}"""
_SCROLL_JS = "(x) => document.querySelectorAll('.ag-body-horizontal-scroll-viewport').forEach(e => e.scrollLeft = x)"


def grid_rows(page, key_column: str = "Model name") -> dict[str, dict[str, str]]:
    """Every cell of the Models tab's grid, {row's `key_column` text (last line): {header: text}}.
    The grid (ag-grid) renders only the columns in view, so it is read while scrolled across."""
    out: dict[str, dict[str, str]] = {}
    x = 0
    while True:
        page.evaluate(_SCROLL_JS, x)
        page.wait_for_timeout(400)
        seen = page.evaluate(_GRID_JS)
        for cells in seen["rows"].values():
            named = {seen["heads"].get(k, k): v for k, v in cells.items()}
            if named.get(key_column):
                out.setdefault(named[key_column].splitlines()[-1], {}).update(named)
        if x >= seen["width"] - seen["view"] or seen["view"] <= 0:
            page.evaluate(_SCROLL_JS, 0)
            return out
        x += max(seen["view"] // 2, 100)


def scroll_grid_to(page, header: str) -> None:
    """Scroll the Models tab's grid so that column `header` is the first one beside the pinned
    ones (the model's name, status, creation time)."""
    x = 0
    while True:
        page.evaluate(_SCROLL_JS, x)
        page.wait_for_timeout(400)
        left = page.evaluate(
            "(h) => { const c = [...document.querySelectorAll('.ag-header-viewport .ag-header-cell')]"
            ".find(e => e.innerText.trim() === h); return c ? parseFloat(c.style.left) : null; }",
            header,
        )
        if left is not None:
            page.evaluate(_SCROLL_JS, left)
            page.wait_for_timeout(800)
            return
        seen = page.evaluate(_GRID_JS)
        if x >= seen["width"] - seen["view"] or seen["view"] <= 0:
            raise AssertionError(f"no column {header!r} in the grid")
        x += max(seen["view"] // 2, 100)


def registered_versions(page_text: str) -> str:
    """The "Model versions" entry of a logged model page's side panel ("None" when unregistered)."""
    lines = [l.strip() for l in page_text.split("Model versions", 1)[-1].strip().splitlines() if l.strip()]
    if "Model versions" not in page_text or not lines:
        return ""
    return "None" if lines[0] == "None" else " ".join(lines[:2])


def take_model_screenshots(base: str, experiment_id: str, model_id: str, model_name: str, out: Path) -> list[Path]:
    """docs/review_model_registered.png (the registered model's page: no "Not registered",
    its version in the side panel), docs/review_models_tab.png (the Models tab: one model per
    trial, named by it, the registered one with its version) and docs/review_models_metrics.png
    (the same, scrolled to the models' metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    shots = [out / "review_model_registered.png", out / "review_models_tab.png", out / "review_models_metrics.png"]
    with browser() as b:
        page = model_page(b, base, experiment_id, model_id, model_name)
        page.screenshot(path=str(shots[0]))
        page.close()
        page = models_tab(b, base, experiment_id, model_name)
        page.screenshot(path=str(shots[1]))
        scroll_grid_to(page, "forget_gap")  # the metrics beside the names (metric columns run A-Z)
        page.screenshot(path=str(shots[2]))
        page.close()
    return shots


def export_knee(root: Path, tracking_uri: str, parent_run_id: str) -> tuple[str, str]:
    """`coun-tune export PARENT --pick knee` (registers the knee's model, alias @knee); returns
    (the knee's trial run id, the export's stdout)."""
    from tests._search_helpers import run_cli

    out = root / "knee.yaml"
    done = run_cli(
        ["export", parent_run_id, "--pick", "knee", "--output", str(out), "--tracking-uri", tracking_uri],
        cwd=root,
        timeout=300,
    )
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out.read_text()).group(1)
    return run_id, done.stdout


def tiny_search(root: Path, name: str = "review_demo", num_samples: int = 4) -> tuple[str, str]:
    """Run a real `coun-tune search` (digits, tiny recipe); returns (tracking URI, its stdout)."""
    from tests._search_helpers import run_cli, write_spec

    uri = f"sqlite:///{root}/mlflow.db"
    write_spec(
        root / "spec.yaml",
        name,
        cache_dir=root / "cache",
        storage_path=root / "results",
        tracking_uri=uri,
        num_samples=num_samples,
        max_concurrent_trials=2,
    )
    return uri, run_cli(["search", "spec.yaml"], cwd=root, timeout=900).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    why = chromium_missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctune-ui-") as tmp:
        if args.tracking_uri:
            import io

            from coun_tune.tracking.mlflow_store import client_for
            from coun_tune.tracking.review import review_pareto

            uri = args.tracking_uri
            client = client_for(uri)
            parent = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="tags.`coun_tune.role` = 'search'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )[0]
            buf = io.StringIO()
            review_pareto(client, parent.info.run_id, out=buf)
            stdout = buf.getvalue()
        else:
            uri, stdout = tiny_search(Path(tmp))
        fragment = printed_fragment(stdout)
        experiment_id = re.search(r"#/experiments/(\w+)/", fragment).group(1)
        parent_id = re.search(r"viewStateShareKey=coun-tune-(\w+)", fragment).group(1)
        from coun_tune.tracking.mlflow_store import client_for
        from coun_tune.tracking.models import logged_model_of

        knee_run, _ = export_knee(Path(tmp), uri, parent_id)
        knee = logged_model_of(client_for(uri), knee_run)
        with mlflow_server(uri) as base:
            shots = take_screenshots(base, fragment, experiment_id, parent_id, Path(args.out))
            shots += take_model_screenshots(base, experiment_id, knee.model_id, knee.name, Path(args.out))
            for path in shots:
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main())
