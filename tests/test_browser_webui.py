"""Opt-in: the LoRA Loop tab in a REAL AUTOMATIC1111 / Forge webui, used through its web page in headless Chromium.

    A1111_DIR=/work/hosts/forge-classic .venv/bin/python -m pytest -m browser tests/test_browser_webui.py -s

Skipped unless A1111_DIR is set AND `-m` names `browser`. The webui is started exactly as tests/test_a1111_real_webui.py
starts it (its `webui_server` fixture: CPU, random SD1.5 checkpoint, this repository linked in as an extension, a
temporary --data-dir); the browser is Debian's chromium driven by Playwright (tests/browser/). One tab is used
throughout, as a user would.

Checked, in order: the LoRA Loop tab renders every setting with its default and its hover help (the webui's hint
titles), with no console error of ours; Show plan shows the plan; Train (3 steps at 64 px) moves the webui's progress
bar and ends with the result; Cancel stops a long run and saves what was trained; then txt2img with
`<lora:NAME:0.8>` typed into the prompt gives another image than the same prompt without it (same seed), and the
same image again without it. Screenshots go to a tmp folder (printed with -s), one per test at teardown (on failure
too); with LORALOOP_PICTURES set (docs/images) the README's webui-tab.png is written there too.
"""

from __future__ import annotations

import io
import json
import math
import re
import time

import pytest
from browser.chromium import Console, Shots, chromium, opt_in, without
from browser.webui import WEBUI_NOISE, WebuiPage
from test_a1111_real_webui import _dataset, webui_server  # noqa: F401 - the fixture that starts the webui

pytestmark = [pytest.mark.browser, pytest.mark.a1111]

NAME = "ll_browser"
CANCEL_NAME = "ll_browser_cancel"
TRAIN_STEPS = 3
HOST_DEFAULTS = {"output_dir": r"[/\\]output[/\\]loraloop$"}  # the webui's outputs folder (a1111/webui.py work_dir)
TIMINGS: dict[str, object] = {}


@pytest.fixture(scope="module")
def webui(request):
    opt_in(request, "A1111_DIR", "AUTOMATIC1111/Forge webui")
    t0 = time.perf_counter()
    server = request.getfixturevalue("webui_server")  # tests/test_a1111_real_webui.py's, imported below
    TIMINGS["webui start (checkpoint written, launched)"] = round(time.perf_counter() - t0, 1)
    yield server
    print("\nLoRA Loop tab in the browser, timings (s) and findings:", json.dumps(TIMINGS, indent=1))


@pytest.fixture(scope="module")
def shots(webui, tmp_path_factory) -> Shots:
    s = Shots(tmp_path_factory.mktemp("webui-screenshots"))
    yield s
    print(f"\nscreenshots: {s.folder}")


@pytest.fixture(scope="module")
def console() -> Console:
    return Console()


@pytest.fixture(scope="module")
def ui(webui, console):
    with chromium() as browser:
        t0 = time.perf_counter()
        page = WebuiPage(browser, webui["base"], console).open()
        TIMINGS["page load"] = round(time.perf_counter() - t0, 1)
        yield page
        page.close()


@pytest.fixture(autouse=True)
def _screenshot_after(request, shots):
    yield
    if "ui" in request.fixturenames:
        shots.safe(request.getfixturevalue("ui").page, f"after-{request.node.name}")


@pytest.fixture(scope="module")
def dataset(webui):
    return _dataset(webui["tmp"] / "browser_dataset")


def _errors(console: Console, mark: int = 0) -> list:
    left, ignored = without(console.since(mark), WEBUI_NOISE)
    TIMINGS.setdefault("ignored console entries", []).extend(sorted({f"{k}: {t[:90]} {u}" for k, t, u in ignored}))
    return left


def _same(shown: dict, default: object) -> bool:
    value = shown.get("value")
    if isinstance(default, bool):
        return value is default
    if isinstance(default, (int, float)):
        try:
            return math.isclose(float(value), float(default), rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(default, (list, tuple)):
        return value in ("\n".join(map(str, default)), ", ".join(map(str, default)))
    return str(value) == ("" if default is None else str(default))


# -- the tab ---------------------------------------------------------------------------------------------------------
def test_tab_renders_every_setting_with_its_default_and_help(ui, console, shots):
    from loraloop.a1111 import widgets as form

    ui.tab("LoRA Loop")
    assert ui.page.locator("#tab_loraloop").is_visible()
    ui.open_accordions()
    fields = form.form_fields()
    wrong, no_help = [], []
    for field in fields:
        shown = ui.value(field.name)
        assert not shown.get("missing"), f"no widget for {field.name}"
        if field.name in HOST_DEFAULTS:  # decided by the webui: checked against the rule, not the engine's default
            if not re.search(HOST_DEFAULTS[field.name], str(shown.get("value"))):
                wrong.append((field.name, shown.get("value"), HOST_DEFAULTS[field.name]))
        elif not _same(shown, field.default):
            wrong.append((field.name, shown.get("value"), field.default))
        if shown.get("kind") != "checkbox" and not shown.get("title"):
            no_help.append(field.name)
    assert wrong == [], wrong
    assert no_help == [], f"no hover help on: {no_help}"
    # the help is the engine's text (a checkbox's label carries it too)
    hint = ui.evaluate("() => titles['learning_rate']")
    assert hint and hint == ui.value("learning_rate")["title"]
    TIMINGS["fields checked"] = len(fields)
    assert _errors(console) == []


def test_show_plan_shows_the_plan(ui, dataset, console):
    mark = console.mark()
    ui.tab("LoRA Loop")
    for name, value in (("train_data_dir", str(dataset)), ("resolution", 64), ("min_bucket_reso", 64),
                        ("max_bucket_reso", 64), ("max_train_steps", TRAIN_STEPS), ("learning_rate", 0.05),
                        ("lr_scheduler", "constant"), ("lora_rank", 4), ("output_name", NAME),
                        ("trigger_word", "llstyle"), ("sample_steps", 2)):
        ui.set(name, value)
    ui.click("loraloop_check")
    report = ui.wait_text("loraloop_report", r"\S", 120)
    assert "4 usable" in report, report
    t0 = time.perf_counter()
    ui.click("loraloop_plan_button")
    plan = ui.wait_text("loraloop_plan", r"\S", 300)
    TIMINGS["plan"] = round(time.perf_counter() - t0, 1)
    assert "ERROR" not in plan, plan
    assert f"{TRAIN_STEPS} steps" in plan and "64px" in plan and "Memory plan" in plan, plan
    assert _errors(console, mark) == []


def _watch(ui: WebuiPage, until_re: str, timeout_s: float, stop: object = None) -> list[dict]:
    """Progress bar and status samples until #loraloop_result matches `until_re` (or `stop(samples)` is true)."""
    samples, deadline = [], time.monotonic() + timeout_s
    while True:
        sample = ui.progress()
        if not samples or sample != samples[-1]:
            samples.append(sample)
        if re.search(until_re, ui.text("loraloop_result")) or (stop is not None and stop(samples)):
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"no /{until_re}/ in {timeout_s:.0f} s; last: {samples[-3:]}, "
                               f"result {ui.text('loraloop_result')!r}")
        time.sleep(0.3)


def _widths(samples: list[dict]) -> list[float]:
    return [float(s["width"].rstrip("%")) for s in samples if s.get("width") and s["width"].endswith("%")]


def test_train_moves_the_progress_bar_and_reports_the_result(ui, webui, shots, console):
    mark = console.mark()
    t0 = time.perf_counter()
    ui.click("loraloop_train")
    samples = _watch(ui, rf"Saved {NAME}\.safetensors|error|Error", 1800)
    TIMINGS["train (3 steps at 64 px, preview)"] = round(time.perf_counter() - t0, 1)
    result = ui.text("loraloop_result")
    assert f"Trained {TRAIN_STEPS} steps" in result and f"<lora:{NAME}:" in result, result
    widths = _widths(samples)
    assert any(s["bar"] for s in samples), "the webui's progress bar never showed"
    assert len(set(widths)) >= 2 and widths == sorted(widths), f"the progress bar did not move: {samples}"
    statuses = [s["status"] for s in samples if s.get("status")]
    assert any(re.search(r"step|Step", s) for s in statuses), statuses
    TIMINGS["progress seen"] = [f"{s['width']} {s['text'] or ''}".strip() for s in samples if s.get("width")][:12]
    lora_dir = webui["data"] / "models" / "Lora"
    assert (lora_dir / f"{NAME}.safetensors").is_file()
    for _ in range(240):  # the webui removes its progress bar when the job has ended
        if not ui.progress()["bar"]:
            break
        time.sleep(0.5)
    # the picture: the tab's Train section after the run (status, live and final loss, preview, result)
    ui.page.wait_for_timeout(2500)
    ui.scroll_to("loraloop_train", above=60)  # the "4. Train" heading at the top of the window
    shots.take(ui.page, "tab-after-training", "webui-tab.png")
    shots.take(ui.page, "tab-train-section", **ui.section_clip("loraloop_train", "loraloop_result"))
    assert _errors(console, mark) == []


def test_cancel_stops_a_long_run_and_saves_what_was_trained(ui, webui, console):
    mark = console.mark()
    ui.tab("LoRA Loop")
    ui.set("max_train_steps", 5000)
    ui.set("output_name", CANCEL_NAME)
    t0 = time.perf_counter()
    ui.click("loraloop_train")

    def two_steps(samples: list[dict]) -> bool:
        text = " ".join(s.get("status") or "" for s in samples[-3:])
        match = re.findall(r"step (\d+)", text)
        return bool(match) and max(map(int, match)) >= 2

    _watch(ui, r"$^", 900, stop=two_steps)
    ui.click("loraloop_cancel")
    t1 = time.perf_counter()
    _watch(ui, r"Cancelled after|error|Error", 600)
    TIMINGS["cancel: Cancel → result"] = round(time.perf_counter() - t1, 1)
    TIMINGS["cancel: whole run"] = round(time.perf_counter() - t0, 1)
    result = ui.text("loraloop_result")
    match = re.search(r"Cancelled after (\d+) of (\d+) steps\. What was trained so far is saved as (\S+)\.safetensors",
                      result)
    assert match, result
    steps, saved = int(match.group(1)), match.group(3)
    assert steps >= 2 and int(match.group(2)) == 5000, result
    assert (webui["data"] / "models" / "Lora" / f"{saved}.safetensors").is_file()
    TIMINGS["cancel: saved"] = f"{saved} after {steps} steps"
    ui.set("max_train_steps", TRAIN_STEPS)
    ui.set("output_name", NAME)
    assert _errors(console, mark) == []


def _pixels(png: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_txt2img_with_the_lora_tag_gives_another_image(ui, webui, console):
    mark = console.mark()
    prompt = "llstyle, a red square"
    t0 = time.perf_counter()
    base = _pixels(ui.txt2img(prompt, seed=1234, size=64, steps=3))
    with_lora = _pixels(ui.txt2img(f"{prompt} <lora:{NAME}:0.8>", seed=1234, size=64, steps=3))
    again = _pixels(ui.txt2img(prompt, seed=1234, size=64, steps=3))
    TIMINGS["txt2img ×3 (64 px, 3 steps)"] = round(time.perf_counter() - t0, 1)
    assert base.shape == with_lora.shape and base.std() > 0
    delta = abs(with_lora - base)
    TIMINGS["lora image mean |Δ| (0-255)"] = round(float(delta.mean()), 2)
    assert delta.mean() > 0.5, "the <lora:…> tag did not change the image"
    assert (again == base).all(), "the image without the tag changed after the LoRA was used"
    info = ui.text("html_info_txt2img") or ui.text("html_info")
    log = webui["log"].read_text(errors="replace")
    assert not re.search(rf"[Nn]etworks? not found: {NAME}|could not find {NAME}", log + info)
    assert _errors(console, mark) == []
