"""End to end in a real browser (Debian's Chromium driven by Playwright): a person trains the toy LoRA and tries it
without touching a terminal. Screenshots go to $UI_SCREENSHOT_DIR (docs/ui when refreshing the docs)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="BROWSER TEST SKIPPED: Debian's chromium is not installed (apt-get install chromium); "
                             ".ci/run installs it")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "ui", "--workspace", str(tmp_path / "ws"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in proc.stdout:  # it prints the address once it is about to serve
        if line.startswith("open "):
            url = line.split()[1]
            break
    assert url, "the server printed no address"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url, tmp_path / "ws"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1360, "height": 900})
        yield pg
        browser.close()


def test_train_the_toy_lora_and_try_it_from_the_browser(server, page, tmp_path):
    url, ws = server
    shots = Path(os.environ.get("UI_SCREENSHOT_DIR", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    timings["page_ready_s"] = time.perf_counter() - t0
    assert page.input_value("#field-lora_rank") == "8"  # the demo config, loaded into the form

    # A bad value gets the CLI's message beside its field; fixing it clears the message.
    page.fill("#field-lora_rank", "-3")
    page.wait_for_selector("#box-lora_rank.invalid")
    assert "lora_rank = -3" in page.inner_text("#err-lora_rank")
    page.screenshot(path=str(shots / "config-validation-error.png"), full_page=False)
    page.fill("#field-lora_rank", "4")
    page.wait_for_selector("#box-lora_rank:not(.invalid)")
    assert page.inner_text("#err-lora_rank") == ""

    # A short run with preview images, saved under a new name.
    page.click("details > summary")
    page.fill("#field-max_train_steps", "24")
    page.fill("#field-sample_prompts", "[a glowing cyan circle in the center, dark cyber laboratory, neon lighting, neon lab style]")
    page.fill("#field-sample_every_n_steps", "12")
    page.fill("#field-sample_steps", "10")
    page.fill("#config-path", "neon_quick.yaml")
    page.wait_for_selector("#config-status.good")
    t_start = time.perf_counter()
    page.click("#start-job")
    page.wait_for_selector("#tab-jobs.active")
    page.wait_for_function("document.querySelector('#job-progress-text').textContent.includes('step ')", timeout=120_000)
    timings["start_to_first_progress_s"] = time.perf_counter() - t_start
    page.wait_for_function("document.querySelector('#job-progress-text').textContent.startsWith('100 % · done')", timeout=300_000)
    timings["start_to_done_s"] = time.perf_counter() - t_start
    page.wait_for_selector("#job-samples img")
    points = page.get_attribute("#loss-raw", "points")
    assert len(points.split()) == 24
    page.screenshot(path=str(shots / "training.png"), full_page=True)
    assert (ws / "neon_quick.yaml").exists() and (ws / "output/neon_lab/neon_lab.safetensors").exists()

    # Dataset: thumbnails with captions, edit one in place, run the pre-flight check.
    page.click("nav button[data-tab='dataset']")
    page.wait_for_selector(".thumb img")
    first = page.locator(".thumb textarea").first
    first.fill("a glowing cyan circle in the center, dark cyber laboratory, neon lighting, neon lab style, edited")
    first.dispatch_event("change")
    page.wait_for_selector(".thumb .status.good")
    assert "edited" in (ws / "data/neon_lab/metadata.csv").read_text()
    page.click("#run-check")
    page.wait_for_selector("#check-report:not([hidden])")
    page.screenshot(path=str(shots / "dataset.png"), full_page=False)

    # Library: the new LoRA is listed; try it at strength 1.
    page.click("nav button[data-tab='library']")
    page.wait_for_selector("#lora-neon_lab")
    page.click("#lora-neon_lab button")
    page.fill("#gen-prompt", "a glowing magenta square on the left, dark cyber laboratory, neon lighting, neon lab style "
                             "<lora:neon_lab:1>")
    page.fill("#gen-steps", "15")
    t_gen = time.perf_counter()
    page.click("#gen-run")
    page.wait_for_selector("#gen-out img.generated", timeout=120_000)
    timings["generate_s"] = time.perf_counter() - t_gen
    page.wait_for_function("document.querySelector('#gen-out img').naturalWidth > 0")
    page.click("#lora-neon_lab button:has-text('Verify')")
    page.wait_for_selector("#tool-out.good", timeout=60_000)
    assert "0 unmatched keys" in page.inner_text("#tool-out")
    page.screenshot(path=str(shots / "library.png"), full_page=True)

    # Compare the finished run against the base, as `lora-scripts compare` does.
    page.click("nav button[data-tab='jobs']")
    page.check(".compare-tick")
    page.fill("#compare-prompt", "a glowing cyan circle in the center, dark cyber laboratory, neon lighting, neon lab style")
    page.click("#compare-run")
    page.wait_for_selector("#compare-out img.sheet", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#compare-out img')].every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    (shots / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2))
    print("UI timings:", timings)
