"""The dashboard served by `clipkd app` on localhost and driven in Debian's headless Chromium: each page loads,
shows its data (the leaderboard rows, the scatter plot's points), and raises no error, in the page or the console.

CLIPKD_SCREENSHOTS=DIR also keeps the screenshots there, and CLIPKD_BROWSER_DB=URL serves that store instead of the
smoke grid's: the README's pictures are this test over the demo grid's store (`make screenshots`)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, require

pytestmark = pytest.mark.xdist_group("smoke_grid")  # pyproject.toml: one worker runs the group

CHROMIUM = "/usr/bin/chromium"
# page title in the sidebar -> what shows the page has its data
PAGES = {
    "Leaderboard": "[data-testid=stDataFrame] [role=row]",
    "Ablation": "[data-testid=stDataFrame] [role=row]",
    "The paper's findings": "[data-testid=stDataFrame] [role=row]",
    "Feature similarity vs accuracy": ".js-plotly-plot .scatterlayer .point",
    "Accuracy vs cost": ".js-plotly-plot .scatterlayer .point",
    "Training curves": ".js-plotly-plot .scatterlayer .trace",
    "Run detail": "[data-testid=stDataFrame] [role=row]",
    "Grid progress": ".js-plotly-plot .barlayer .point",
}


# page -> (the control a reader turns on: its role and label, what shows it took effect)
INTERACTIONS = {
    "Ablation": ("switch", "the paper's Table 1 beside every method",
                 "[data-testid=stDataFrame] [role=columnheader]:has-text('paper Δ')"),
    "Training curves": ("radio", "samples seen", ".js-plotly-plot .xtitle:has-text('samples seen')"),
}


def turn_on(page, role: str, label: str, shows: str) -> None:
    """Click a control's label, wait until the control is on, then wait for what it shows. A click that lands while
    Streamlit replaces the page's elements can be lost: then the control stays off and is clicked again; clicking
    only when it is off never turns a toggle back off."""
    from playwright.sync_api import expect

    control = page.get_by_role(role, name=label).first
    for _ in range(3):
        if control.is_checked():
            break
        page.get_by_text(label).first.click()
        try:
            expect(control).to_be_checked(timeout=15_000)
        except AssertionError:
            continue
    try:
        page.wait_for_selector(shows, state="attached", timeout=60_000)
    except Exception as error:  # say what the page showed instead
        pytest.fail(f"{label!r} ({'on' if control.is_checked() else 'off'}) never showed {shows}: {error}\n"
                    f"the page: {page.locator('[data-testid=stMain]').inner_text()[:3000]}")


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp: hex address, hex port)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


STORE = os.environ.get("CLIPKD_BROWSER_DB")  # None: the smoke grid's store, whose rows the test knows


def start_app(workdir: Path) -> tuple[subprocess.Popen, int]:
    """``clipkd app`` on a free port, once it answers its health check; on another port if one was taken between
    finding it free and Streamlit binding it."""
    store = ["--db", STORE] if STORE else []
    for _ in range(3):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "harness.cli", "app", "--port", str(port), *store],
                                  cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return server, port
            except OSError:
                time.sleep(0.5)
        server.kill()
        output = server.stdout.read()
        if "address already in use" not in output.lower():
            break
    pytest.fail(f"clipkd app did not start:\n{output}")


LIVE_RUN = "still-training"


@pytest.fixture(scope="module")
def live_workdir(smoke_grid, tmp_path_factory):
    """The smoke grid's store (a copy) and runs, and beside them a run still training: ``clipkd run`` writes its
    progress and curves to the store as it trains, and is frozen (SIGSTOP) once they are there, so the pages show
    a run in the middle of its training for as long as the test looks."""
    import signal

    from results.queries import running_runs, training_curves
    from results.store import Store

    workdir = tmp_path_factory.mktemp("live_store")
    shutil.copytree(smoke_grid[0] / "results", workdir / "results")
    (workdir / "runs").symlink_to(smoke_grid[0] / "runs")
    config = workdir / "live.yaml"
    config.write_text(json.dumps({
        "name": LIVE_RUN, "output_dir": "live-runs", "student": {"model": "clipkd-tiny"},
        "data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 5},
        "train": {"batch_size": 16, "steps": 100_000, "log_every": 5, "live_every_s": 0.5}}))
    training = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(config)], cwd=workdir,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        store, deadline = Store(f"sqlite:///{workdir / 'results' / 'clipkd.db'}", readonly=True), time.monotonic() + 240
        while time.monotonic() < deadline and training.poll() is None:
            running = running_runs(store)
            running = running[(running["name"] == LIVE_RUN) & (running["step"].fillna(0) >= 20)]
            if len(running) and len(training_curves(store, list(running["id"]))):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the run {LIVE_RUN!r} never published its progress (exit code {training.poll()})")
        store.engine.dispose()
        training.send_signal(signal.SIGSTOP)
        yield workdir
    finally:
        os.killpg(training.pid, signal.SIGKILL)
        training.wait(timeout=30)


@pytest.fixture(scope="module")
def served_app(request):
    workdir = ROOT if STORE else request.getfixturevalue("live_workdir")
    server, port = start_app(workdir)
    yield f"http://127.0.0.1:{port}", port, workdir
    server.terminate()
    server.wait(timeout=30)


def assert_progress_curves_are_the_runs(page, workdir: Path, title: str, metric: str) -> None:
    """The chart titled ``title`` (METRIC (BENCHMARK)), against samples seen: each run's points are those of its
    eval_log.jsonl, at step × global batch: accuracy during training, and the paper's §4.4 pair similarity gap."""
    traces = page.evaluate("""title => {
        const plot = [...document.querySelectorAll('.js-plotly-plot')].find(
            p => (p.layout.title.text || '').replace(/<[^>]*>/g, '').startsWith(title));
        return plot && plot._fullData.filter(t => t.x).map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}));
    }""", title)
    assert traces, f"no chart of {title} against samples seen"
    logs = {}
    for config_file in (workdir / "runs").glob("*/config.json"):
        config = json.loads(config_file.read_text())
        points = [json.loads(line) for line in (config_file.parent / "eval_log.jsonl").read_text().splitlines()]
        logs[config["name"]] = (config["train"]["batch_size"], points)
    for trace in traces:
        batch, points = logs[trace["name"]]
        assert trace["x"] == [p["step"] * batch for p in points] == [p["samples_seen"] for p in points]
        assert trace["y"] == pytest.approx([p[metric] for p in points], abs=1e-12)
        assert len(points) >= 3


def assert_a_running_run_has_curves(page) -> None:
    """The run still training is among the chosen runs, said to be training, with its loss curve drawn."""
    assert page.get_by_text(f"still training: {LIVE_RUN}").count() == 1
    names = page.evaluate("""() => {
        const plot = [...document.querySelectorAll('.js-plotly-plot')].find(
            p => (p.layout.title.text || '').replace(/<[^>]*>/g, '') === 'task');
        return plot && plot._fullData.map(t => [t.name, t.x.length]);
    }""")
    assert names and any(name == LIVE_RUN and points >= 4 for name, points in names), names


def test_app_listens_on_localhost_only(served_app):
    assert listening_addresses(served_app[1]) == {"127.0.0.1"}


def test_every_page_in_headless_chromium(served_app, tmp_path):
    require(Path(CHROMIUM).is_file(), "Chromium is not installed (scripts/install_debian.sh chromium)")
    from playwright.sync_api import sync_playwright

    url, _, workdir = served_app
    problems = []
    keep = os.environ.get("CLIPKD_SCREENSHOTS")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(url)
        for title, data in PAGES.items():
            # through the sidebar, as a reader moves between pages (Streamlit's own first load of a page's URL
            # probes <page>/_stcore/health, a 404 in the console: streamlit/streamlit#7074)
            page.locator("[data-testid=stSidebarNav] a", has_text=title).click()
            page.wait_for_selector(f'h1:has-text("{title}")', timeout=60_000)
            page.wait_for_selector(data, state="attached", timeout=60_000)  # a table's rows are its a11y DOM
            page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=60_000)  # rerun done
            if title in INTERACTIONS:  # as a reader would: the paper beside every method, curves against samples
                turn_on(page, *INTERACTIONS[title])
                page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=60_000)
            assert page.locator("[data-testid=stException]").count() == 0, title
            assert page.locator("[data-testid=stAlertContentError]").count() == 0, title
            name = title.lower().replace(" ", "-") + ".png"
            page.screenshot(path=tmp_path / name, full_page=True)
            if keep:
                shutil.copy(tmp_path / name, Path(keep) / name)
            if title == "Leaderboard" and not STORE:
                trained, references = page.locator("[data-testid=stDataFrame]").all()
                rows = trained.locator("[role=row]").all_text_contents()
                assert len(rows) == 1 + 9  # the header and the smoke grid's nine runs
                assert any("crd+fd+icl" in row for row in rows) and any("baseline" in row for row in rows)
                apart = references.locator("[role=row]").all_text_contents()  # the reference model, apart
                assert len(apart) == 2 and "pretrained:published-tiny-teacher.pt" in apart[1]
                assert page.locator("h3:has-text('Reference models')").count() == 1
            if title == "Training curves" and not STORE:
                assert_progress_curves_are_the_runs(page, workdir, "zero-shot acc1", "acc1")
                assert_progress_curves_are_the_runs(page, workdir, "pair_similarity_gap", "pair_similarity_gap")
                assert_a_running_run_has_curves(page)
            if title == "Grid progress" and not STORE:
                table = page.locator("[data-testid=stDataFrame]").nth(1)  # below "Training now", after the grids'
                table.locator("[role=row]").nth(1).wait_for(state="attached", timeout=60_000)
                running = table.locator("[role=row]").all_text_contents()
                assert len(running) == 2 and LIVE_RUN in running[1] and "100000" in running[1]
            if title == "The paper's findings" and not STORE:  # each finding stated with its verdict
                text = page.locator("[data-testid=stMain]").inner_text()
                assert "1. Every distillation loss beats the baseline" in text and "7. The methods rank as in Table 1" in text
                assert any(verdict in text for verdict in ("holds", "contradicted", "unresolved at this power"))
            if title == "Feature similarity vs accuracy" and not STORE:
                assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 6
                assert "fit (r = " in page.locator(".js-plotly-plot").inner_text()
        browser.close()
    assert problems == []
