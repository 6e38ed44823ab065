"""The dashboard in a real browser, watching a real federation: the page follows the run as it happens.

The server runs in this process (real plugins, the tiny Faster R-CNN); its
three clients are real client processes training on tiny synthetic data.
Headless Chromium (Debian's ``chromium`` package, driven by playwright, which
never downloads a browser of its own here) opens the page once and, without
reloading it, must see the clients' states change, the round counter and the
mAP curve advance round by round, and a client that is killed mid-run turn
``dropped``.  The page must never poll: one request for the event stream,
none for ``/dashboard/state``.

A screenshot of the finished page is saved in the test's tmp dir; set
``FEDPLUG_DASHBOARD_SCREENSHOT=<path>`` to copy it somewhere (the docs' picture,
``benchmarks/results/dashboard.png``, was made that way).
"""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from scripted import compose_cfg

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
STEP_S = 240  # the longest any milestone may take on a loaded 2-core machine (round 1 includes start-up)


def _chromium_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: the browser test needs Debian's chromium (apt-get install chromium)")
    return pytest.importorskip("playwright.async_api", reason="pip install playwright (it is in the test extra)")


async def _watch(tmp_path: Path, playwright_api) -> dict:
    from fedplug.data import prepare_federation
    from fedplug.launcher import ClientProcesses, client_command
    from fedplug.plugins import activate
    from fedplug.server import FederationServer
    from omegaconf import OmegaConf

    cfg = compose_cfg("run.rounds=3", "run.num_clients=3", "run.min_clients=3", "run.clients_per_round=3",
                      "data.train_per_client=8", "data.test_per_client=4", "train.local_epochs=1",
                      "server.quorum=0.5", "server.reconnect_grace_s=2", "server.ready_timeout_s=240",
                      "server.update_timeout_s=240", "server.eval_timeout_s=240", "server.ping_interval_s=2")
    federation = prepare_federation(OmegaConf.to_container(cfg.data, resolve=True), 3)
    plugins = activate({"aggregator": "fedavg", "detector": "frcnn", "resource_policy": "always"},
                       disabled=["plots", "tensorboard"])
    run_dir = tmp_path / "run"
    lines: list[str] = []
    server = FederationServer(cfg, plugins, tuple(federation.class_names), run_dir, echo=lines.append)
    port = await server.start()
    url = f"http://127.0.0.1:{port}"
    names = list(federation.client_names or [f"client_{i + 1}" for i in range(3)])[:3]
    commands = {name: client_command(url, name, spec, run_dir, 1, None, "cpu", None)
                for name, spec in zip(names, federation.client_specs)}
    processes = ClientProcesses()
    result: dict = {"lines": lines, "run_dir": run_dir}
    run = None
    stopped = False
    try:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1500})
                requests: list[str] = []
                page.on("request", lambda r: requests.append(r.url))
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(url + "/")  # redirects to /dashboard/
                await page.wait_for_selector("#connection.conn-live", timeout=20_000)
                await page.evaluate("window.__opened_once = true")  # gone if the page ever reloads

                processes.start(commands, run_dir / "clients")
                run = asyncio.get_running_loop().create_task(server.run_federation())

                async def until(js: str, arg=None, what: str = ""):
                    try:
                        await page.wait_for_function(js, arg=arg, timeout=STEP_S * 1000, polling=250)
                    except playwright_api.TimeoutError:
                        raise AssertionError(f"the page never showed {what}; server said:\n" + "\n".join(lines[-30:]))

                rows = "document.querySelectorAll('#clients tbody tr')"
                await until(f"{rows}.length === 3", what="three clients")
                await until("[...document.querySelectorAll('#clients tbody tr')]"
                            ".some(r => r.dataset.state === 'training')", what="a client training")
                await until("document.getElementById('round').textContent.startsWith('1 /')", what="round 1")
                curve = "document.querySelector('#chart-quality path[data-series=\"mAP@0.5\"]')"
                await until(f"{curve} && {curve}.dataset.points === '1'", what="round 1's point on the mAP curve")
                result["after_round_1"] = await page.inner_text("#rounds tbody")

                victim = names[-1]
                # killed as soon as the page shows round 2: a round takes about half a second here, shorter than
                # the page's polling, so waiting to *see* the victim training raced with its training ending
                await until("v => document.querySelector(`#clients tr[data-client=\"${v}\"]`) &&"
                            " document.getElementById('round').textContent.startsWith('2 /')",
                            arg=victim, what=f"round 2 with {victim} in the table")
                processes.procs[victim].kill()  # SIGKILL during round 2
                await until("v => document.querySelector(`#clients tr[data-client=\"${v}\"]`)"
                            ".dataset.state === 'dropped'", arg=victim, what=f"{victim} dropped")
                result["victim_row"] = await page.inner_text(f'#clients tr[data-client="{victim}"]')

                await until(f"{curve}.dataset.points === '3'", what="three points on the mAP curve")
                await until("document.getElementById('round').textContent === '3 / 3'", what="round 3 / 3")
                result["status"] = await asyncio.wait_for(run, STEP_S)
                await until("document.getElementById('phase').textContent === 'finished'", what="phase finished")
                result["reloaded"] = not await page.evaluate("window.__opened_once === true")
                result["best"] = await page.inner_text("#best-round")
                result["checkpoint"] = await page.inner_text("#best-checkpoint")
                result["victim_state_end"] = await page.get_attribute(f'#clients tr[data-client="{victim}"]',
                                                                      "data-state")
                result["states_end"] = await page.evaluate(
                    "[...document.querySelectorAll('#clients tbody tr')].map(r => [r.dataset.client, r.dataset.state])")
                result["events_rows"] = await page.locator("#events tbody tr").count()
                await page.check("#per-client")  # per-client curves on demand
                per_client = "#chart-quality path[data-series$=' mAP@0.5']"
                try:  # drawn on the next animation frame, which a loaded machine delays: wait for it, bounded
                    await page.wait_for_function(f"document.querySelectorAll({per_client!r}).length >= 2",
                                                 timeout=15_000)
                except playwright_api.TimeoutError:
                    pass  # the count below says what was drawn
                result["per_client_paths"] = await page.locator(per_client).count()
                stopped = True
                await server.stop()  # as the app does after the run: the page is told, and keeps the last state
                await until("document.getElementById('connection').classList.contains('conn-ended')",
                            what="the end of the stream")
                result["rounds_table_end"] = await page.locator("#rounds tbody tr").count()
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                result["screenshot"] = shot
                result["requests"] = requests
                result["errors"] = errors
                result["victim"] = victim
            finally:
                await browser.close()
    finally:
        if run is not None and not run.done():
            run.cancel()
        if not stopped:
            await server.stop()
        processes.stop(grace=30)
    return result


def test_the_page_follows_a_real_federation_and_shows_a_killed_client_as_dropped(tmp_path, monkeypatch):
    playwright_api = _chromium_or_skip()
    monkeypatch.setenv("FEDPLUG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-hub"))  # nothing pretrained: offline and fresh
    r = asyncio.run(_watch(tmp_path, playwright_api))
    assert r["status"] == 0, "\n".join(r["lines"][-40:])
    assert not r["errors"], r["errors"]
    assert not r["reloaded"]
    assert r["after_round_1"].startswith("1")
    assert "dropped" in r["victim_row"] and r["victim_state_end"] == "dropped"
    others = [state for cid, state in r["states_end"] if cid != r["victim"]]
    assert len(others) == 2 and set(others) == {"finished"}
    assert r["best"] in {"1", "2", "3"} and r["checkpoint"].endswith("best.safetensors")
    assert r["events_rows"] > 10 and r["per_client_paths"] >= 2 and r["rounds_table_end"] == 3
    # pushed, not polled: the page asked for its event stream once and never for the state
    assert sum(u.endswith("/dashboard/events") for u in r["requests"]) == 1
    assert not any(u.endswith("/dashboard/state") for u in r["requests"])
    assert all(u.startswith("http://127.0.0.1:") for u in r["requests"])  # nothing from the internet
    assert r["screenshot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy_to = os.environ.get("FEDPLUG_DASHBOARD_SCREENSHOT")
    if copy_to:
        shutil.copyfile(r["screenshot"], copy_to)
