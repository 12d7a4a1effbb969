"""Opt-in: the node pack in a REAL ComfyUI, used through its web page in headless Chromium (tests/browser/README.md).

    COMFYUI_DIR=/work/hosts/comfyui-0.33 .venv/bin/python -m pytest -m browser tests/test_browser_comfyui.py -s

Skipped unless COMFYUI_DIR is set AND `-m` names `browser`. The server is the one of tests/test_comfy_real.py
(tests/comfy_real_support/server.py: `--cpu`, a throw-away base directory with this repository linked into
custom_nodes), with the random SD1.5 checkpoint (tests/comfy_real_support/checkpoint.py) linked in under the name
the examples use (v1-5-pruned-emaonly.safetensors) and the demo dataset at 64 px in input/style_dataset. The
browser is Debian's chromium driven by Playwright (tests/browser/). One tab is used from start to end, as a user
would, so the last test sees the LoRA list of a page that was never reloaded.

Checked, in order: (1) the pack's web/ extension loads with no console error that the same page does not show
without it; (2) the nodes are in the node search under "LoRA Loop"; (3) every example workflow opens with no
missing node and no widget value the front-end would refuse; (4) the training example, shrunk for CPU in its widgets
(64 px, 4 steps), runs from the Run button, with progress and the live loss chart updating; (5) Cancel (the queue's
Cancel button) stops a long training cleanly and saves what was trained; (6) the saved LoRA appears in LoraLoader's
list without reloading the page (after R: refresh node definitions; the test reports whether R was needed).
Screenshots: a tmp folder (printed with -s), one per test at teardown (on failure too); with LORALOOP_PICTURES set
(docs/images) the README's comfyui-graph.png and comfyui-loss-chart.png are written there too.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from browser.chromium import Console, Shots, baseline_of, chromium, opt_in, without
from browser.comfy import FRONTEND_NOISE, ComfyPage
from comfy_real_support.server import ComfyServer, copy_dataset, interrupted, make_layout, message_kinds

pytestmark = [pytest.mark.browser, pytest.mark.comfyui]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TRAIN_EXAMPLE = ROOT / "example_workflows" / "train_style_lora_and_sample.json"
DEMO = ROOT / "cli" / "demo" / "dataset"
EXAMPLE_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # what the examples name
RESOLUTION = 64
TRAIN_STEPS = 4
CANCEL_NAME = "cancelflat"
CANCEL_AFTER_STEPS = 2
# Model files an example names that a fresh install cannot have: continue_training_a_lora resumes the LoRA that
# train_style_lora_and_sample saves. Such a value is the user's to pick; every other combo value must be an option.
USER_MODEL_FILES = {("LoRALoop_TrainConfig", "resume_lora"): "flatstyle.safetensors"}
TIMINGS: dict[str, object] = {}


def _timed(name: str, t0: float) -> None:
    TIMINGS[name] = round(time.perf_counter() - t0, 1)


@pytest.fixture(scope="module")
def comfy_dir(request) -> Path:
    path = opt_in(request, "COMFYUI_DIR", "ComfyUI")
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={path} has no main.py")
    return path


@pytest.fixture(scope="module")
def server(comfy_dir, tmp_path_factory):
    from comfy_real_support.checkpoint import sd15_checkpoint

    t0 = time.perf_counter()
    ckpt = sd15_checkpoint()
    base = make_layout(tmp_path_factory.mktemp("comfyui-browser"), ckpt)
    (base / "models" / "checkpoints" / EXAMPLE_CHECKPOINT).symlink_to(ckpt)
    copy_dataset(DEMO, base / "input" / "style_dataset", RESOLUTION)
    settings = base / "user" / "default" / "comfy.settings.json"  # a returning user: no first-run template dialog
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}), encoding="utf-8")
    srv = ComfyServer(comfy_dir, base, extra_args=("--disable-api-nodes",))
    srv.start()
    _timed("server start", t0)
    yield srv
    srv.stop()
    print(f"\nComfyUI in the browser ({comfy_dir.name}), timings (s) and findings:", json.dumps(TIMINGS, indent=1))
    if os.environ.get("LORALOOP_KEEP_COMFY_LOG"):
        Path(os.environ["LORALOOP_KEEP_COMFY_LOG"]).write_text(srv.log_text(), encoding="utf-8")
    (base / "custom_nodes" / "loraloop").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(server, tmp_path_factory) -> Shots:
    s = Shots(tmp_path_factory.mktemp("comfyui-screenshots"))
    yield s
    print(f"\nscreenshots: {s.folder}")


@pytest.fixture(scope="module")
def console() -> Console:
    return Console()


@pytest.fixture(scope="module")
def ui(browser, server, console) -> ComfyPage:
    """The one tab of the whole module (never reloaded)."""
    t0 = time.perf_counter()
    page = ComfyPage(browser, server.url, console).open()
    _timed("page load", t0)
    yield page
    page.close()


@pytest.fixture(autouse=True)
def _screenshot_after(request, shots):
    yield
    if "ui" in request.fixturenames:
        shots.safe(request.getfixturevalue("ui").page, f"after-{request.node.name}")


def _errors(console: Console, mark: int, baseline: set = frozenset()) -> list:
    left, ignored = without(console.since(mark), FRONTEND_NOISE, baseline)
    TIMINGS.setdefault("ignored console entries", []).extend(sorted({f"{k}: {t[:90]} {u}" for k, t, u in ignored}))
    return left


# -- (1) the front-end extension loads ------------------------------------------------------------------------------
def test_frontend_extension_loads_without_console_errors(browser, server, ui, console):
    baseline_console = Console()
    bare = ComfyPage(browser, server.url, baseline_console, block_pack=True).open()
    try:
        assert "loraloop.nodes" not in bare.extensions()
    finally:
        bare.close()
    assert ui.pack_script_status == 200, "web/loraloop.js was not served to the page"
    assert "loraloop.nodes" in ui.extensions(), "the pack's extension did not register"
    errors = _errors(console, 0, baseline_of(baseline_console.entries))
    assert not [e for e in console.entries if e[0] == "pageerror"], console.entries
    assert errors == [], errors
    # the chart's draw hook is installed on TrainLoRA: a new node is taller by the chart and draws its placeholder
    node = ui.add_node("LoRALoop_TrainLoRA", (100, 100))
    ui.page.wait_for_timeout(500)
    assert "waiting for the first step…" in ui.chart(), "the TrainLoRA node does not draw the loss chart"
    size = ui.evaluate("(id) => app.graph.getNodeById(id).size", node)
    assert size[0] >= 320 and size[1] > 140, size


# -- (2) node search ------------------------------------------------------------------------------------------------
def test_nodes_are_found_in_node_search_under_lora_loop(ui):
    source = (ROOT / "nodes" / "definitions.py").read_text()
    expected = {"LoRALoop_" + m for m in re.findall(r'node_id=PREFIX \+ "(\w+)"', source)}
    registered = ui.node_types("LoRALoop_")
    assert set(registered) == expected
    assert {t["category"] for t in registered.values()} == {"LoRA Loop"}, registered
    results = ui.search_nodes("LoRA Loop")
    ours = [r for r in results if "LoRA Loop" in r]
    titles = {t["display_name"] or t["title"] for t in registered.values()}
    assert len(ours) == len(expected), results
    assert all(any(r.startswith(title) for r in ours) for title in titles), (titles, ours)
    ui.pick_search_result()  # Enter adds the highlighted node, as a user would
    added = ui.evaluate("() => app.graph.nodes.map(n => n.type)")
    assert len(added) == 1 and added[0] in expected, added
    ui.page.keyboard.press("Escape")


# -- (3) the examples open cleanly ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_opens_without_missing_nodes_or_invalid_values(ui, console, path):
    mark = console.mark()
    workflow = json.loads(path.read_text())
    ui.load_workflow(workflow)
    report = ui.graph_report()
    assert len(report) == len(workflow["nodes"])
    unknown = [n["type"] for n in report if not n["registered"]]
    assert unknown == [], unknown
    assert ui.missing_node_notices() == [], ui.notices()
    bad, user_files = [], set()
    for node in report:
        for w in node["widgets"]:
            if w["name"].startswith("UNKNOWN"):
                bad.append((node["type"], w["name"], "a widget the node does not have"))
            elif w["options"] is not None and w["value"] not in w["options"]:
                if USER_MODEL_FILES.get((node["type"], w["name"])) == w["value"]:
                    user_files.add((node["id"], w["value"]))
                else:
                    bad.append((node["type"], w["name"], w["value"], "not one of", w["options"][:8]))
            elif isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool):
                low, high = w["min"], w["max"]
                if (low is not None and w["value"] < low) or (high is not None and w["value"] > high):
                    bad.append((node["type"], w["name"], w["value"], "outside", low, high))
    assert bad == [], bad
    # 1.49 marks a node whose model file is missing (1.38 does not): only the user's own files may be missing
    flagged = {n["id"] for n in report if n["has_errors"]}
    assert flagged <= {node_id for node_id, _ in user_files}, (flagged, user_files)
    expected_notices = {f"{name} is missing" for _, name in user_files}
    assert all(any(e in n for e in expected_notices) for n in ui.notices()), ui.notices()
    # the front-end's own conversion to a prompt takes every widget value (no shifted widgets_values)
    prompt = ui.evaluate("async () => (await app.graphToPrompt()).output")
    assert {v["class_type"] for v in prompt.values()} == {n["type"] for n in workflow["nodes"]} - {"Note"}
    assert _errors(console, mark) == []
    TIMINGS.setdefault("examples: notices shown", {})[path.stem] = ui.notices()
    TIMINGS.setdefault("examples: nodes that overlap as laid out (not a failure)", {})[path.stem] = \
        ui.overlapping_nodes()


# -- (4) a tiny training with progress and the live chart ----------------------------------------------------------
def _shrink_training(ui: ComfyPage, **train_config) -> Any:
    """What a user with a small CPU would change in the example's widgets (cf. test_comfy_real.shrink_for_cpu)."""
    ui.set_widgets("CheckpointLoaderSimple", {"ckpt_name": EXAMPLE_CHECKPOINT})
    ui.set_widgets("LoRALoop_TrainConfig", {"resolution": RESOLUTION, "min_bucket_reso": RESOLUTION,
                                            "max_train_steps": TRAIN_STEPS, "sample_every_n_steps": 0,
                                            "sample_steps": 1, "learning_rate": 1e-3, "lr_warmup_steps": 0,
                                            **train_config})
    ui.set_widgets("EmptyLatentImage", {"width": RESOLUTION, "height": RESOLUTION})
    ui.set_widgets("KSampler", {"steps": 2})
    return ui.node_id("LoRALoop_TrainLoRA")


def _steps(chart: list[str]) -> list[int]:
    return [int(m.group(1)) for t in chart if (m := re.match(r"step (\d+)(?:/\d+ · loss|: loss)", t))]


def test_training_shows_progress_and_the_live_loss_chart(ui, console, server, shots):
    mark = console.mark()
    ui.load_workflow(json.loads(TRAIN_EXAMPLE.read_text()))
    train_id = _shrink_training(ui)
    ui.set_setting("Comfy.Minimap.Visible", False)
    ui.dismiss_notices()
    t0 = time.perf_counter()
    chart_before = len(ui.chart())
    start = ui.click_run()
    pictured = {}

    def picture_live_chart(state: dict) -> bool:  # the node mid-training: progress bar, status line, chart
        if not pictured and max(_steps(state["chart"][chart_before:]), default=0) >= TRAIN_STEPS - 1:
            rect = ui.frame_node(train_id, 320, 110, 1.25)
            clip = {"x": rect["left"] + 300, "y": rect["top"] + 90, "width": min(rect["width"] + 40, 900),
                    "height": min(rect["height"] + 40, 690)}
            pictured["path"] = shots.take(ui.page, "loss-chart-live", "comfyui-loss-chart.png", clip=clip)
            pictured["overlaps"] = ui.chart_overlaps(train_id)
        return False

    state = ui.wait_for_run(start, timeout_s=1800, until=picture_live_chart)
    _timed("run: train example (4 steps at 64 px) + sample", t0)
    events = state["events"]
    assert state["end"] == "execution_success", (events[-5:], server.log_tail())
    # progress: the node's progress events count the steps, the tab title shows the percentage while it trains
    progress = [e["detail"]["value"] for e in events
                if e["type"] == "progress" and str(e["detail"].get("node")) == str(train_id)]
    assert progress[:TRAIN_STEPS] == list(range(1, TRAIN_STEPS + 1)), progress
    assert any(re.search(r"\[\d+%\]", t) for t in state["titles"]), state["titles"]
    # the live chart: one loss event per step, and the chart redrawn with each new step while training ran
    losses = [e["detail"] for e in events if e["type"] == "loraloop.loss" and "step" in (e["detail"] or {})]
    assert [d["step"] for d in losses] == list(range(1, TRAIN_STEPS + 1)), losses
    drawn = _steps(state["chart"][chart_before:])
    assert drawn and drawn == sorted(drawn) and drawn[-1] == TRAIN_STEPS and len(set(drawn)) >= 2, state["chart"]
    last = state["chart"][-1]
    assert last.startswith(f"step {TRAIN_STEPS}/{TRAIN_STEPS} · loss {losses[-1]['loss']:.4f}"), last
    assert pictured, "no screenshot of the live chart"
    # the nodes show their results
    saved = ui.widget_text("LoRALoop_SaveLoRA") or ""
    assert "flatstyle.safetensors" in saved, saved
    assert (server.base / "models" / "loras" / "flatstyle.safetensors").is_file()
    assert _errors(console, mark) == []
    TIMINGS["train: steps drawn by the chart"] = drawn
    # the workflow in the editor, after the run (outputs shown)
    ui.dismiss_notices()
    ui.frame_area(-110, -250, 0.62)
    shots.take(ui.page, "training-workflow", "comfyui-graph.png")
    # nothing is drawn over the chart: not the progress text while it trains, not the result text afterwards
    assert pictured["overlaps"] == [], f"widgets drawn over the live chart: {pictured['overlaps']}"
    after = ui.chart_overlaps(train_id)
    assert after == [], f"widgets drawn over the chart after the run: {after}"


# -- (5) Cancel ------------------------------------------------------------------------------------------------------
def test_cancel_stops_a_long_training_cleanly(ui, console, server):
    mark = console.mark()
    ui.load_workflow(json.loads(TRAIN_EXAMPLE.read_text()))
    train_id = _shrink_training(ui, max_train_steps=100_000, seed=11)
    ui.set_widgets("LoRALoop_TrainLoRA", {"name": CANCEL_NAME, "save_on_cancel": True})
    ui.set_widgets("LoRALoop_SaveLoRA", {"name": CANCEL_NAME})
    log_start = len(server.log_text())
    chart_before = len(ui.chart())
    t0 = time.perf_counter()
    start = ui.click_run()

    def reached(state: dict) -> bool:
        steps = [e["detail"]["step"] for e in state["events"]
                 if e["type"] == "loraloop.loss" and "step" in (e["detail"] or {})]
        return max(steps, default=0) >= CANCEL_AFTER_STEPS

    state = ui.wait_for_run(start, timeout_s=1200, until=reached)
    assert state["end"] is None, ("the run ended before the cancel", state["events"][-5:])
    ui.click_cancel()
    t1 = time.perf_counter()
    state = ui.wait_for_run(start, timeout_s=600)
    _timed("cancel: Cancel → interrupted", t1)
    _timed("cancel: whole run", t0)
    assert state["end"] == "execution_interrupted", state["events"][-5:]
    (stopped,) = [e["detail"] for e in state["events"] if e["type"] == "execution_interrupted"]
    assert str(stopped.get("node_id")) == str(train_id), stopped
    entry = server.get(f"/history/{stopped['prompt_id']}")[stopped["prompt_id"]]
    assert interrupted(entry), message_kinds(entry)
    log = server.log_text()[log_start:]
    assert "Traceback" not in log and "!!! Exception" not in log, log[-4000:]
    files = sorted((server.base / "models" / "loras").glob(f"{CANCEL_NAME}*"))
    assert len(files) == 1 and re.fullmatch(rf"{CANCEL_NAME}-cancelled-step\d{{6}}\.safetensors", files[0].name), files
    steps = int(files[0].stem.rsplit("step", 1)[1])
    drawn = _steps(ui.chart()[chart_before:])
    assert steps >= CANCEL_AFTER_STEPS and max(drawn) <= steps, (steps, drawn)
    # nothing after TrainLoRA ran, and the page shows no error dialog (an interrupt is not an error)
    ran = {str(e["detail"].get("node")) for e in state["events"] if e["type"] == "executed"}
    assert str(ui.node_id("KSampler")) not in ran
    assert not [n for n in ui.notices() if re.search(r"error|exception|traceback", n, re.I)], ui.notices()
    assert _errors(console, mark) == []
    TIMINGS["cancel: steps drawn / saved"] = f"{max(drawn)} / {steps} ({files[0].name})"


# -- (6) the new LoRA in LoraLoader's list, same page ---------------------------------------------------------------
def test_saved_lora_is_listed_in_loraloader_without_reloading_the_page(ui, server):
    assert (server.base / "models" / "loras" / "flatstyle.safetensors").is_file(), "needs the training test"
    loader = ui.add_node("LoraLoader", (200, 200))
    before = ui.combo_options(loader, "lora_name")
    listed_at_once = "flatstyle.safetensors" in before
    if not listed_at_once:
        ui.refresh_node_definitions()  # R, as a user would
    after = ui.combo_options(loader, "lora_name")
    fresh = ui.add_node("LoraLoader", (200, 500))
    TIMINGS["LoraLoader list"] = ("listed at once" if listed_at_once else
                                  f"needs R (refresh node definitions): before {before}, after {after}")
    assert "flatstyle.safetensors" in after, after
    assert "flatstyle.safetensors" in ui.combo_options(fresh, "lora_name")
    # the example that continues this LoRA now opens with nothing missing
    ui.dismiss_notices()
    ui.load_workflow(json.loads((ROOT / "example_workflows" / "continue_training_a_lora.json").read_text()))
    assert [n["type"] for n in ui.graph_report() if n["has_errors"]] == [], ui.notices()
    assert not [n for n in ui.notices() if "missing" in n.lower()], ui.notices()
    assert ui.never_reloaded()
