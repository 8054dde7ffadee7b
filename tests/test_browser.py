"""What a person sees in the MLflow UI, checked in a real browser (Debian's headless chromium driven by Playwright).

One small tracking store is built the way the README's Quick start builds one (`mlflow run . -e tune`, then
`mlflow run . -e bias_eval`, few trials and epochs), served by `mlflow server` on 127.0.0.1, and opened in a browser
that can reach nothing else (every other host is blocked and listed). Each step is screenshotted into
browser-screenshots/ at the repository root.

These tests never skip: without chromium (`apt-get install chromium`) or playwright (the `test` extra) they fail.
`playwright install` is never needed: the system chromium is launched by path.

Under pytest-xdist the store is built once for all workers (a file lock); each worker runs its own server and browser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
from filelock import FileLock

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "browser-screenshots"
TIMEOUT_MS = 60_000  # the UI is slow on 2 busy cores: generous waits everywhere
EXPERIMENT = "bias-lab"
MODEL = "bias-lab"
TUNE_RUN = "tune-lenet"
# the browser may only talk to the local server; anything else (a CDN, telemetry) is aborted and recorded
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# localStorage keys of the MLflow 3.17 UI: the assistant side panel that opens by itself on a first visit would cover a
# quarter of every screenshot; the sidebar's "GenAI | Model training" switch (absent = GenAI)
CLOSE_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)
MODEL_TRAINING_MODE = "localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'));"


# ---------------------------------------------------------------------------------------------------------------------
# The tracking store (built once), the server, the browser
# ---------------------------------------------------------------------------------------------------------------------


def _env(store_dir: Path) -> dict[str, str]:
    leaks = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")  # as tests/conftest.py drops them
    env = {k: v for k, v in os.environ.items() if k not in leaks}
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{(store_dir / 'mlflow.db').resolve()}",
            "BIAS_LAB_CACHE": str(store_dir / "cache"),
            "TQDM_DISABLE": "1",  # as tests/conftest.py: no progress bars
            "OMP_NUM_THREADS": "1",  # as the tests' subprocesses: one thread, the other core is another xdist worker's
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",  # nothing leaves the machine
            # `mlflow run --env-manager local` runs `python entrypoints/...` from PATH: this interpreter's
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def _mlflow_run(store_dir: Path, entry: str, *params: str) -> None:
    """`mlflow run <repo> -e ENTRY --env-manager local --experiment-name bias-lab -P ...`: the README's Quick start."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        EXPERIMENT,
        *[a for p in params for a in ("-P", p)],
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=store_dir, env=_env(store_dir), capture_output=True, text=True, timeout=900)
    (store_dir / f"{entry}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`mlflow run -e {entry}` failed (exit {proc.returncode}) after "
            f"{time.perf_counter() - t0:.0f} s; its last output:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    print(f"mlflow run -e {entry}: {time.perf_counter() - t0:.0f} s")


def _build_store(store_dir: Path) -> dict[str, Any]:
    store_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the Quick start's commands, small; 32 px images and one thread as tests/conftest.py's FAST runs and the tests'
    # subprocesses (the UI shows the same pages at any size)
    small = ("image_size=32", "threads=1")
    _mlflow_run(store_dir, "tune", "n_trials=3", "epochs=2", *small)
    _mlflow_run(store_dir, "bias_eval", "epochs=4", *small)
    client = mlflow.MlflowClient(tracking_uri=_env(store_dir)["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT!r} in the store the Quick start's commands built"
    runs = client.search_runs([exp.experiment_id], max_results=1000)

    def parent(entry: str):
        found = [
            r
            for r in runs
            if r.data.tags.get("mlflow.project.entryPoint") == entry and "mlflow.parentRunId" not in r.data.tags
        ]
        assert len(found) == 1, f"expected one `{entry}` parent run, found {[r.info.run_name for r in found]}"
        return found[0]

    tune, bias_eval = parent("tune"), parent("bias_eval")
    trials = sorted(
        r.info.run_name
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id and r.info.run_name.startswith("trial-")
    )
    return {
        "experiment_id": exp.experiment_id,
        "tune_run_id": tune.info.run_id,
        "tune_run_name": tune.info.run_name,
        "trials": trials,
        "bias_eval_run_id": bias_eval.info.run_id,
        "bias_eval_run_name": bias_eval.info.run_name,
        "model_2_verdict": bias_eval.data.tags.get("model_2_verdict", ""),
        "champion_version": client.get_model_version_by_alias(MODEL, "champion").version,
        "build_s": round(time.perf_counter() - t0, 1),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tracking store (built once per pytest session, shared by xdist workers) and the ids the tests open.

    BIAS_LAB_BROWSER_STORE=<dir> keeps the store there and reuses it in later sessions (to iterate on the UI checks
    without retraining; delete the folder after changing what the runs log)."""
    base = tmp_path_factory.getbasetemp()
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, common to all workers
    with FileLock(str(session / "browser-screenshots.lock")):
        if not (session / "browser-screenshots.cleared").exists():  # once per session: no stale pictures
            SHOTS.mkdir(exist_ok=True)
            for old in SHOTS.glob("*.png"):
                old.unlink()
            (session / "browser-screenshots.cleared").touch()
    if os.environ.get("BIAS_LAB_BROWSER_STORE"):
        store_dir = Path(os.environ["BIAS_LAB_BROWSER_STORE"]).resolve()
        root = store_dir.parent
    else:
        root, store_dir = session, session / "browser-store"
    root.mkdir(parents=True, exist_ok=True)
    done, failed = store_dir / "store.json", store_dir / "store.failed"
    with FileLock(str(root / f"{store_dir.name}.lock")):
        if failed.exists():
            pytest.fail(failed.read_text(), pytrace=False)
        if not done.exists():
            try:
                info = _build_store(store_dir)
            except Exception as e:  # noqa: BLE001 - every worker fails with the same readable message
                failed.write_text(f"building the tracking store failed: {e}")
                raise
            done.write_text(json.dumps(info))
    info = json.loads(done.read_text())
    print(f"store: {store_dir} (built in {info['build_s']} s); screenshots: {SHOTS}")
    return {**info, "dir": str(store_dir)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on the store (127.0.0.1, a free port); its base URL. Killed, with its workers, at teardown."""
    store_dir = Path(store["dir"])
    cwd = tmp_path_factory.mktemp("mlflow-server")  # anything it writes beside itself stays out of the repository
    log_path = cwd / "server.log"
    port = _free_port()
    # runs' artifacts are local paths (the experiment's artifact location): the server reads them, no artifact flags
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        _env(store_dir)["MLFLOW_TRACKING_URI"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=_env(store_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"`mlflow server` exited ({proc.returncode}) before answering /health:\n"
                    f"{log_path.read_text()[-3000:]}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"`mlflow server` did not answer {base}/health within 120 s:\n{log_path.read_text()[-3000:]}",
                    pytrace=False,
                )
            time.sleep(0.5)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker, nothing else
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, driven by Playwright. Missing either one is a failure, never a skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: `pip install -e '.[test]'` installs it (tests/test_browser.py drives "
            "the MLflow UI in a real browser)",
            pytrace=False,
        )
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed: `apt-get install -y chromium` (.ci/run does); tests/test_browser.py "
            "drives the MLflow UI in it (`playwright install` is not used)",
            pytrace=False,
        )
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture
def open_page(browser: Browser, server: str) -> Iterator[Callable[..., Page]]:
    """open_page(path, model_training=True): a new browser profile (empty localStorage) at server + path.

    model_training=True is a person who has once clicked the sidebar's "Model training" switch (MLflow keeps that in
    localStorage); False is a browser that has never opened this MLflow UI."""
    contexts = []

    def _open(path: str, model_training: bool = True) -> Page:
        ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        ctx.set_default_timeout(TIMEOUT_MS)
        ctx.set_default_navigation_timeout(TIMEOUT_MS)
        blocked: list[str] = []
        errors: list[str] = []

        def route(r: Any) -> None:
            url = r.request.url
            host = re.match(r"^(?:https?|wss?)://([^/:]+)", url)
            if host is None or host.group(1) in LOCAL_HOSTS:  # data:, blob: and local requests pass
                r.continue_()
            else:
                blocked.append(url)
                r.abort()

        ctx.route("**/*", route)
        # top frame only: artifact iframes are sandboxed (no localStorage there)
        ctx.add_init_script(
            "if (window === window.top) { try {"
            + CLOSE_ASSISTANT
            + (MODEL_TRAINING_MODE if model_training else "")
            + "} catch (e) {} }"
        )
        page = ctx.new_page()
        # MLflow's one-time tips (e.g. GenAI Overview's "Detect Issues ... Got it") cover the page and swallow clicks:
        # dismissed as a person would, whenever one is in the way of an action
        page.add_locator_handler(page.get_by_role("button", name="Got it"), lambda b: b.click())
        page.on("console", lambda m: errors.append(m.text[:300]) if m.type == "error" else None)
        page.blocked, page.errors = blocked, errors  # read by _fail()
        contexts.append((ctx, blocked))
        page.goto(server + path)
        return page

    yield _open
    for ctx, blocked in contexts:
        if blocked:
            print(f"blocked (not 127.0.0.1/localhost): {sorted(set(blocked))}")
        ctx.close()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: screenshots, readable failures
# ---------------------------------------------------------------------------------------------------------------------


def _shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _fail(page: Page, step: str, what: str) -> None:
    """Screenshot the page as it is and fail saying what a person sees wrong."""
    try:
        path = str(_shot(page, f"{step}-FAILED"))
    except Exception as e:  # noqa: BLE001 - the message matters more than the picture
        path = f"(no screenshot: {e})"
    blocked = sorted(set(getattr(page, "blocked", [])))
    errors = getattr(page, "errors", [])[-5:]
    pytest.fail(
        f"{what}\n  page: {page.url}\n  screenshot: {path}"
        + (f"\n  requests blocked (not 127.0.0.1): {blocked}" if blocked else "")
        + (f"\n  browser console errors (last 5): {errors}" if errors else ""),
        pytrace=False,
    )


def _see(page: Page, locator: Locator, step: str, what: str, timeout: int = TIMEOUT_MS) -> Locator:
    """Wait until `locator` is visible; else screenshot and fail with `what` (what a person does not see)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.first.wait_for(state="visible", timeout=timeout)
    except PlaywrightTimeout:
        seen = False
    else:
        seen = True
    if not seen:  # failed outside the except: no "during handling of the above exception" noise
        _fail(page, step, f"{what} (waited {timeout // 1000} s)")
    return locator.first


def _first_visible(page: Page, locators: dict[str, Locator], timeout: int = TIMEOUT_MS) -> str | None:
    """The key of whichever locator becomes visible first, or None."""
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        for key, loc in locators.items():
            if loc.first.is_visible():
                return key
        page.wait_for_timeout(250)
    return None


def _artifact_paths(server: str, run_id: str, path: str = "") -> list[str]:
    """The run's artifact files and folders, from the server's REST API (for failure messages)."""
    q = f"run_id={run_id}" + (f"&path={path}" if path else "")
    with urllib.request.urlopen(f"{server}/api/2.0/mlflow/artifacts/list?{q}", timeout=30) as r:
        files = json.load(r).get("files", [])
    return [f["path"] + ("/" if f.get("is_dir") else "") for f in files]


# ---------------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------------


def test_browser_experiment_list_shows_bias_lab_and_opens_its_training_runs(open_page, store) -> None:
    """The experiments list shows bias-lab; opening it shows the training-runs table.

    MLflow 3.17 picks an experiment's landing page from the sidebar's "GenAI | Model training" switch (localStorage,
    or ?workflowType= in the URL), not from the experiment's `mlflow.experimentKind` tag, and the switch starts on
    GenAI: a browser that never opened this UI lands on GenAI's "Overview" whatever the project tags. So this test
    accepts that first landing (screenshot a2) and checks that one click on "Model training" shows the runs, and that
    the choice sticks.
    """
    page = open_page("/#/experiments", model_training=False)
    _see(
        page, page.get_by_role("heading", name="Experiments", exact=True), "a1-experiments-list", "no experiments list"
    )
    link = _see(
        page,
        page.get_by_role("link", name=EXPERIMENT, exact=True),
        "a1-experiments-list",
        f"the experiments list does not show {EXPERIMENT!r}",
    )
    _shot(page, "a1-experiments-list")
    link.click()
    runs_table = page.get_by_role("link", name=store["tune_run_name"], exact=True)
    # the GenAI overview may open with a "Detect Issues in Your Traces" popover that hides the rest from the
    # accessibility tree (its heading is then not 'visible' to Playwright): either one says where the browser landed
    popover = page.get_by_text("Detect Issues in Your Traces", exact=True)
    genai = page.get_by_role("heading", name="Overview", exact=True).or_(popover)
    landed = _first_visible(page, {"runs": runs_table, "genai": genai})
    if landed == "genai":  # let the GenAI overview finish loading before the picture (a handler dismisses the popover)
        _first_visible(page, {"loaded": page.get_by_text("Detect Issues", exact=True)}, timeout=20_000)
    _shot(page, "a2-bias-lab-opened")
    if landed is None:
        _fail(
            page,
            "a2-bias-lab-opened",
            f"clicking {EXPERIMENT!r} shows neither its runs table "
            f"({store['tune_run_name']!r}) nor MLflow's GenAI Overview",
        )
    print(f"a browser that never chose the sidebar switch lands on: {landed} ({page.url})")
    if landed == "genai":
        switch = _see(
            page,
            page.get_by_text("Model training", exact=True),
            "a3-model-training",
            "the GenAI landing page has no 'Model training' switch in the sidebar to reach the training runs",
        )
        switch.click()
    _see(
        page,
        runs_table,
        "a3-training-runs",
        f"the {EXPERIMENT!r} experiment does not show its training runs table with {store['tune_run_name']!r}",
    )
    _see(
        page,
        page.get_by_role("link", name=store["bias_eval_run_name"], exact=True),
        "a3-training-runs",
        f"the runs table does not show the bias_eval run {store['bias_eval_run_name']!r}",
    )
    assert "/runs" in page.url, f"the runs table is not at .../runs: {page.url}"
    _shot(page, "a3-training-runs")
    # the switch sticks (localStorage): reopening the UI, the list's link opens the runs directly
    page.goto(page.url.split("#")[0] + "#/experiments")
    page.reload()
    _see(page, page.get_by_role("heading", name="Experiments", exact=True), "a4-reopened", "no experiments list")
    _see(
        page, page.get_by_role("link", name=EXPERIMENT, exact=True), "a4-reopened", "the experiments list is gone"
    ).click()
    _see(
        page, runs_table, "a4-reopened", f"after choosing 'Model training', {EXPERIMENT!r} no longer opens on its runs"
    )
    _shot(page, "a4-reopened")


def test_browser_tune_parent_run_and_its_trials_are_shown(open_page, store) -> None:
    page = open_page("/#/experiments")
    _see(
        page, page.get_by_role("link", name=EXPERIMENT, exact=True), "b-runs", f"no {EXPERIMENT!r} in the list"
    ).click()
    parent = _see(
        page,
        page.get_by_role("link", name=store["tune_run_name"], exact=True),
        "b-runs",
        f"the runs table does not show the tune parent run {store['tune_run_name']!r}",
    )
    assert store["trials"], "the tune run has no nested trial runs in the store"
    first_trial = page.get_by_role("link", name=store["trials"][0], exact=True)
    if not first_trial.first.is_visible():  # nested runs start collapsed under their parent: the row's [+] button
        row = page.get_by_role("row").filter(has=parent)
        _see(
            page, row.get_by_role("button"), "b-runs", f"the {store['tune_run_name']!r} row has no expand button"
        ).click()
    for trial in store["trials"]:
        _see(
            page,
            page.get_by_role("link", name=trial, exact=True),
            "b-tune-and-trials",
            f"expanding {store['tune_run_name']!r} does not show its nested trial run {trial!r}",
        )
    _shot(page, "b-tune-and-trials")


def test_browser_tune_run_figures_html_renders_a_plotly_plot(open_page, store, server) -> None:
    page = open_page(f"/#/experiments/{store['experiment_id']}/runs/{store['tune_run_id']}")
    _see(
        page,
        page.get_by_role("heading", name=store["tune_run_name"]),
        "c1-tune-run",
        f"the tune run's page does not show its name {store['tune_run_name']!r}",
    )
    page.get_by_role("tab", name="Artifacts").click()
    _see(
        page, page.get_by_text(re.compile(r"\.(csv|html|json|md)$")), "c1-artifacts", "the Artifacts tab lists no files"
    )
    _shot(page, "c1-artifacts")
    entry = page.get_by_text("figures.html", exact=True)
    if not entry.first.is_visible():
        _fail(
            page,
            "c1-artifacts",
            "the tune run's Artifacts tab has no figures.html; the run's artifacts are "
            f"{_artifact_paths(server, store['tune_run_id'])}",
        )
    entry.first.click()
    frame = page.frame_locator("iframe.mlflow-html-iframe")  # MLflow shows .html artifacts in a sandboxed iframe
    _see(
        page,
        page.locator("iframe.mlflow-html-iframe"),
        "c2-figures",
        "clicking figures.html shows no HTML preview frame",
    )
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        frame.locator(".js-plotly-plot .main-svg").first.wait_for(state="visible", timeout=TIMEOUT_MS)
        rendered = True
    except PlaywrightTimeout:
        rendered = False
    if not rendered:
        n_div = frame.locator(".js-plotly-plot, .plotly-graph-div").count()
        _fail(
            page,
            "c2-figures",
            f"figures.html shows no rendered plotly plot: an empty frame ({n_div} plot divs, no "
            "svg; plotly.js must be inlined, the browser only reaches 127.0.0.1)",
        )
    plots = frame.locator(".js-plotly-plot")
    summary = [
        plots.nth(i).evaluate(
            """gd => (gd.data || []).map(t => ({type: t.type || 'scatter',
             points: Math.max(0, ...['x', 'y', 'z', 'values', 'r', 'lat'].map(k => (t[k] || []).length))
                     + ((t.dimensions || [])[0]?.values || []).length}))"""
        )
        for i in range(plots.count())
    ]
    print(f"figures.html: {len(summary)} plots: {summary}")
    box = frame.locator(".js-plotly-plot .main-svg").first.bounding_box()
    _shot(page, "c2-figures")
    if not any(t["points"] > 0 for traces in summary for t in traces):
        _fail(page, "c2-figures", f"figures.html's plots have no data points: {summary}")
    if not box or box["height"] < 100 or box["width"] < 100:
        _fail(page, "c2-figures", f"figures.html's first plot is drawn at {box}: too small to see")
    assert frame.locator(".js-plotly-plot g.trace").count() > 0, "figures.html's plots draw no trace"


def test_browser_registered_model_shows_champion_alias(open_page, store) -> None:
    page = open_page(f"/#/models/{MODEL}")
    _see(
        page,
        page.get_by_role("heading", name=MODEL, exact=True),
        "d-model",
        f"the registered model page of {MODEL!r} does not show its name",
    )
    _see(
        page,
        page.get_by_text(re.compile(r"^@\s*champion$")),
        "d-model",
        f"the registered model {MODEL!r} shows no '@ champion' alias on any version",
    )
    _shot(page, "d-model")


def test_browser_registered_version_shows_its_model_card(open_page, store) -> None:
    """The champion version's page opens on its card: the headline (classes with names, test accuracy with its CI)
    and the answer to 'Can I trust this model?', with the full card's address."""
    version = store["champion_version"]
    page = open_page(f"/#/models/{MODEL}/versions/{version}")
    _see(
        page,
        page.get_by_text(re.compile(rf"{MODEL} v{version}.*Test accuracy")).first,
        "d2-version",
        f"the version page of {MODEL} v{version} does not show its card's headline",
    )
    _see(
        page,
        page.get_by_text("Can I trust this model?").first,
        "d2-version",
        f"the version page of {MODEL} v{version} does not answer 'Can I trust this model?'",
    )
    _see(
        page, page.get_by_text("model_card.md").first, "d2-version", "the version page does not point at the full card"
    )
    page.get_by_text(re.compile(r"^Inputs \(2\)$")).first.click()  # the pyfunc's signature: images in
    _see(
        page,
        page.get_by_text(re.compile(r"^image\s*(\(optional\))?$")).first,
        "d2-version",
        "the version's schema does not list the 'image' input (the model does not take images)",
    )
    _shot(page, "d2-version")


def test_browser_bias_eval_run_description_shows_conclusion_and_model_table(open_page, store) -> None:
    page = open_page(f"/#/experiments/{store['experiment_id']}/runs/{store['bias_eval_run_id']}")
    _see(
        page,
        page.get_by_role("heading", name=store["bias_eval_run_name"]),
        "e-bias-eval-run",
        f"the bias_eval run's page does not show its name {store['bias_eval_run_name']!r}",
    )
    note = page.get_by_test_id("note-editor-preview-content")  # the rendered markdown of the run's mlflow.note.content
    shown = _first_visible(page, {"note": note, "empty": page.get_by_text("No description", exact=True)})
    if shown != "note":
        _fail(page, "e-bias-eval-run", "the bias_eval run's Description is empty ('No description'): no conclusion")
    note = note.first
    _see(page, note.get_by_text("Conclusion"), "e-bias-eval-run", "the bias_eval run's Description has no 'Conclusion'")
    _shot(page, "e1-bias-eval-run")
    # a long description is folded to a few lines under a "Show more" button (aria-label "Expand description"); the
    # fold only clips, so Playwright would call the hidden table visible: unfold it as a person must
    more = page.get_by_role("button", name="Expand description")
    if _first_visible(page, {"more": more}, timeout=5_000):
        more.first.click()
        less = page.get_by_role("button", name="Collapse description").or_(page.get_by_text("Show less", exact=True))
        _see(page, less, "e2-description", "clicking the Description's 'Show more' does not unfold it")
    table = note.locator("table")
    _see(page, table, "e2-description", "the bias_eval run's Description has no table")
    table.first.scroll_into_view_if_needed()
    cells = " ".join(table.first.locator("td, th").all_inner_texts())
    _shot(page, "e2-description")
    for name in ("model_1", "model_2"):
        if name not in cells:
            _fail(page, "e-bias-eval-run", f"the Description's table does not mention {name}: {cells[:500]!r}")


def test_browser_the_address_a_command_prints_opens_its_run_in_model_training_view(open_page, store) -> None:
    """A browser that never opened this UI, given the address bias_eval printed, shows that run's page with the
    sidebar on "Model training" (not MLflow's GenAI view, where an experiment opens on an empty trace overview)."""
    log = (Path(store["dir"]) / "bias_eval.log").read_text()
    found = re.search(r"http://127\.0\.0\.1:5000/(#/experiments/\S+)", log)
    assert found, f"bias_eval's terminal output names no MLflow UI address:\n{log[-1500:]}"
    assert store["bias_eval_run_id"] in found.group(1), found.group(1)
    page = open_page("/" + found.group(1), model_training=False)
    _see(
        page,
        page.get_by_role("heading", name=store["bias_eval_run_name"]),
        "f-printed-address",
        f"the address bias_eval printed does not open its run {store['bias_eval_run_name']!r}",
    )
    _see(
        page,
        page.get_by_test_id("note-editor-preview-content"),
        "f-printed-address",
        "the run page shows no Description",
    )
    if (
        page.get_by_role("link", name="Overview", exact=True).first.is_visible()
        or page.get_by_text("Observability").first.is_visible()
    ):
        _fail(page, "f-printed-address", "the printed address opens the run in the GenAI sidebar, not 'Model training'")
    _shot(page, "f-printed-address")


def test_browser_the_runs_address_a_command_prints_shows_the_headline_columns(open_page, store) -> None:
    """The 'all runs side by side' address tune prints opens the runs table with the headline columns (MLflow shows
    no metric there by default): test accuracy, best val accuracy and model_2's verdict, with bias_eval's verdict in
    its row."""
    log = (Path(store["dir"]) / "tune.log").read_text()
    found = re.search(r"all runs side by side: http://127\.0\.0\.1:5000/(#/experiments/\S+)", log)
    assert found, f"tune's terminal output names no address for all runs:\n{log[-1500:]}"
    page = open_page("/" + found.group(1), model_training=False)
    for column in ("test_accuracy", "best_val_accuracy", "model_2_verdict"):
        _see(
            page,
            page.get_by_role("columnheader", name=re.compile(column)).first,
            "g-runs-view",
            f"the runs table opened by the printed address has no {column} column",
        )
    verdict = store["model_2_verdict"]
    _see(
        page,
        page.get_by_role("gridcell", name=verdict, exact=True).first,  # only bias_eval's parent has the tag
        "g-runs-view",
        f"the bias_eval run's row does not show model_2's verdict {verdict!r}",
    )
    _shot(page, "g-runs-view")
