"""A page driver for ComfyUI's front-end (tested: comfyui-frontend-package 1.38.13 with ComfyUI 0.12.3, 1.49.6 with
0.33). It uses what a user uses (the Run and Cancel buttons, the node search box, the R key) and, to read state and
set widgets, the `window.app` / `window.LiteGraph` objects that the front-end exposes to extensions.

The live loss chart of web/loraloop.js is drawn on the canvas; the page's `fillText` is wrapped (an init script, it
calls through) to record the chart's caption ("step N/M · loss …"), which is how the tests read the chart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

# Console output of the front-end itself, seen with and without the pack loaded (checked by the test against a page
# that has the pack's script replaced by an empty module; listed here so that a report can name them):
_USER_FILES = (r"/(api/userdata/)?user\.css$|/api/userdata/comfy\.templates\.json$"
               r"|/api/userdata\?dir=(workflows|subgraphs)&")
FRONTEND_NOISE = [
    # the front-end asks for optional user files that a fresh user directory does not have (404)
    ("http", r"^404 GET .*(" + _USER_FILES + ")"),
    ("console", r"^Failed to load resource: the server responded with a status of 404 .*(" + _USER_FILES + ")"),
    # Chromium asks for /favicon.ico by itself (1.38 links none)
    ("http", r"^404 GET .*/favicon\.ico$"),
    ("console", r"^Failed to load resource: the server responded with a status of 404 .*/favicon\.ico$"),
    # 1.49: its settings store reads app.graph while the app starts (assets/settingStore-*.js)
    ("console", r"^ComfyApp graph accessed before initialization"),
    # 1.49: prefetches model files of its own templates from huggingface.co / api.comfy.org; the page's CSP blocks it
    ("console", r"violates the following Content Security Policy directive|^Fetch API cannot load https://"),
]

INIT_SCRIPT = r"""
(() => {
  window.__ll = { chart: [], events: [] };
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
    if (typeof text === 'string' && /^(step \d+(\/\d+ · loss|: loss)|waiting for the first step)/.test(text)) {
      const chart = window.__ll.chart;
      if (chart[chart.length - 1] !== text) chart.push(text);
    }
    return fillText.call(this, text, ...rest);
  };
  // the chart's background (drawChart: fillStyle #1b1b1b, CHART_HEIGHT 140): where the chart is, in node coordinates
  const fillRect = CanvasRenderingContext2D.prototype.fillRect;
  CanvasRenderingContext2D.prototype.fillRect = function (x, y, w, h) {
    if (h === 140 && this.fillStyle === '#1b1b1b') window.__ll.chartRect = [x, y, w, h];
    return fillRect.call(this, x, y, w, h);
  };
})();
"""

# The widgets of node `id` whose rows overlap the last drawn chart (node coordinates: title bar excluded).
CHART_OVERLAPS = r"""(id) => {
  const node = app.graph.getNodeById(id), chart = window.__ll.chartRect;
  if (!chart) return null;
  const [, top, , height] = chart;
  return (node.widgets || []).filter(w => w.name !== 'loraloop_chart').map(w => {
    const y = w.y ?? w.last_y ?? 0;
    const h = w.computedHeight ?? w.computeSize?.(node.size[0])?.[1] ?? LiteGraph.NODE_WIDGET_HEIGHT;
    return { name: w.name, type: w.type, y, h };
  }).filter(w => w.y < top + height && w.y + w.h > top);
}"""

WEB_JS_ENV = "LORALOOP_BROWSER_WEB_JS"  # a file served instead of the pack's web/loraloop.js

READY = "() => !!(window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types?.KSampler)"

LISTEN = r"""() => {
  const api = window.comfyAPI?.api?.api ?? window.app.api;
  const keep = ['loraloop.loss', 'progress', 'execution_start', 'execution_success', 'execution_error',
                'execution_interrupted', 'executing', 'executed', 'execution_cached'];
  for (const type of keep) {
    api.addEventListener(type, ({ detail }) => {
      let d = detail;
      if (type === 'executed') d = { node: detail?.node, text: detail?.output?.text };
      window.__ll.events.push({ type, t: Date.now(), detail: d ?? null });
    });
  }
  return true;
}"""

SET_WIDGETS = r"""([type, values, index]) => {
  const node = app.graph.nodes.filter(n => n.type === type)[index ?? 0];
  if (!node) throw new Error('no ' + type + ' in the graph');
  for (const [name, value] of Object.entries(values)) {
    const w = node.widgets?.find(w => w.name === name);
    if (!w) throw new Error(type + ' has no widget ' + name);
    w.value = value;
    w.callback?.(value, app.canvas, node);
  }
  node.setDirtyCanvas?.(true, true);
  return node.id;
}"""

# What a loaded graph looks like to the user: unknown node types, widgets whose value the front-end would refuse
# (a combo value that is not an option, a number out of bounds), the number of widgets per node.
GRAPH_REPORT = r"""() => {
  const options = (w) => { const v = w.options?.values; return typeof v === 'function' ? v(w) : v; };
  return app.graph.nodes.map(node => ({
    id: node.id, type: node.type, registered: !!LiteGraph.registered_node_types[node.type],
    has_errors: !!node.has_errors,
    widgets: (node.widgets || []).map(w => ({
      name: w.name, type: w.type, value: typeof w.value === 'object' ? null : w.value,
      options: Array.isArray(options(w)) ? options(w) : null,
      min: w.options?.min ?? null, max: w.options?.max ?? null })),
  }));
}"""

COMBO_OPTIONS = r"""([id, name]) => {
  const node = app.graph.getNodeById(id);
  const w = node.widgets.find(w => w.name === name);
  const v = w.options?.values;
  return typeof v === 'function' ? v(w) : v;
}"""

NOTICES = r"""() => Array.from(document.querySelectorAll(
    '[data-testid=error-overlay], .p-toast-message, .p-dialog, [role=alertdialog]'))
  .filter(e => e.offsetParent !== null || e.getClientRects().length)
  .map(e => e.innerText.replace(/\s+/g, ' ').trim()).filter(Boolean)"""

# Place node `id` (title bar included) at (x, y) CSS pixels of the canvas at `scale`.
FRAME_NODE = r"""([id, x, y, scale]) => {
  const node = app.graph.getNodeById(id), ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
  ds.scale = scale;
  ds.offset[0] = x / scale - node.pos[0];
  ds.offset[1] = y / scale - (node.pos[1] - title);
  app.canvas.setDirty(true, true);
  const r = app.canvas.canvas.getBoundingClientRect();
  return { left: r.left, top: r.top, width: node.size[0] * scale, height: (node.size[1] + title) * scale };
}"""

FRAME_AREA = r"""([gx, gy, scale]) => {
  const ds = app.canvas.ds;
  ds.scale = scale; ds.offset[0] = -gx; ds.offset[1] = -gy;
  app.canvas.setDirty(true, true);
  return true;
}"""

MISSING_NODE_TEXT = re.compile(r"missing node|nodes are missing|isn't installed|not installed", re.I)


class ComfyPage:
    """One browser tab on a running ComfyUI."""

    def __init__(self, browser: Any, url: str, console: Any, *, block_pack: bool = False) -> None:
        self.url, self.console = url, console
        self.context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        self.page = self.context.new_page()
        console.attach(self.page)
        self.page.add_init_script(INIT_SCRIPT)
        self.pack_script_status: int | None = None
        if block_pack:  # the same page without the pack's front-end (a baseline for the console)
            self.page.route("**/extensions/loraloop/**", lambda route: route.fulfill(
                status=200, content_type="text/javascript", body="export {};"))
        self.page.on("response", self._response)
        override = os.environ.get(WEB_JS_ENV)
        if override and not block_pack:  # try a change of web/loraloop.js without touching the checkout
            self.page.route("**/extensions/loraloop/loraloop.js", lambda route: route.fulfill(
                status=200, content_type="text/javascript", body=Path(override).read_text(encoding="utf-8")))

    def _response(self, response: Any) -> None:
        if response.url.endswith("/extensions/loraloop/loraloop.js"):
            self.pack_script_status = response.status

    def open(self, timeout_s: float = 180) -> ComfyPage:
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_function(READY, timeout=timeout_s * 1000)
        self.page.wait_for_load_state("networkidle", timeout=timeout_s * 1000)
        self.page.wait_for_timeout(1500)  # extensions' setup() runs after the graph exists
        self.evaluate(LISTEN)
        self.opened = self.evaluate("() => (window.__llOpened = Math.random())")
        return self

    def never_reloaded(self) -> bool:
        """True while this is still the document that open() loaded (no reload, no navigation)."""
        return self.evaluate("() => window.__llOpened ?? null") == self.opened

    def close(self) -> None:
        self.context.close()

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    # -- reading ---------------------------------------------------------------------------------------------------
    def extensions(self) -> list[str]:
        return self.evaluate("() => app.extensions.map(e => e.name)")

    def node_types(self, prefix: str) -> dict[str, dict]:
        return self.evaluate("""(prefix) => Object.fromEntries(Object.entries(LiteGraph.registered_node_types)
            .filter(([k]) => k.startsWith(prefix))
            .map(([k, t]) => [k, { title: t.title, category: t.category ?? t.nodeData?.category,
                                   display_name: t.nodeData?.display_name }]))""", prefix)

    def graph_report(self) -> list[dict]:
        return self.evaluate(GRAPH_REPORT)

    def overlapping_nodes(self) -> list[list[str]]:
        """Pairs of nodes (titles) whose boxes, title bars included, overlap as the graph is laid out now."""
        return self.evaluate(r"""() => {
          const th = LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph.nodes;
          const box = n => [n.pos[0], n.pos[1] - th, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
          const out = [];
          nodes.forEach((a, i) => nodes.slice(i + 1).forEach(b => {
            const [ax0, ay0, ax1, ay1] = box(a), [bx0, by0, bx1, by1] = box(b);
            if (ax0 < bx1 && bx0 < ax1 && ay0 < by1 && by0 < ay1) out.push([a.title, b.title]);
          }));
          return out;
        }""")

    def notices(self) -> list[str]:
        return self.evaluate(NOTICES)

    def missing_node_notices(self) -> list[str]:
        return [n for n in self.notices() if MISSING_NODE_TEXT.search(n)]

    def chart_overlaps(self, node_id: Any) -> list[dict] | None:
        """Widgets drawn where the loss chart is (None: no chart drawn yet)."""
        self.page.wait_for_timeout(300)
        return self.evaluate(CHART_OVERLAPS, node_id)

    def chart(self) -> list[str]:
        return self.evaluate("() => window.__ll.chart.slice()")

    def events(self, since: int = 0) -> list[dict]:
        return self.evaluate("(since) => window.__ll.events.slice(since)", since)

    def event_count(self) -> int:
        return self.evaluate("() => window.__ll.events.length")

    def combo_options(self, node_id: Any, name: str) -> list[str]:
        return self.evaluate(COMBO_OPTIONS, [node_id, name])

    def node_id(self, node_type: str) -> Any:
        return self.evaluate("(t) => app.graph.nodes.find(n => n.type === t)?.id ?? null", node_type)

    def widget_text(self, node_type: str, name: str = "loraloop_result") -> str | None:
        return self.evaluate("""([t, name]) => app.graph.nodes.find(n => n.type === t)
            ?.widgets?.find(w => w.name === name)?.value ?? null""", [node_type, name])

    # -- doing -----------------------------------------------------------------------------------------------------
    def load_workflow(self, workflow: dict) -> None:
        self.evaluate("async (wf) => { await app.loadGraphData(wf); }", json.loads(json.dumps(workflow)))
        self.page.wait_for_timeout(1500)  # notices (missing nodes/models) come a moment later

    def set_widgets(self, node_type: str, values: dict, index: int = 0) -> Any:
        return self.evaluate(SET_WIDGETS, [node_type, values, index])

    def add_node(self, node_type: str, pos: tuple[int, int] = (0, 0)) -> Any:
        return self.evaluate("""([t, pos]) => { const n = LiteGraph.createNode(t); n.pos = pos; app.graph.add(n);
            return n.id; }""", [node_type, list(pos)])

    def search_nodes(self, text: str) -> list[str]:
        """Double-click the empty canvas, type into the node search box: the texts of the results shown."""
        self.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
        box = self.evaluate("() => { const r = app.canvas.canvas.getBoundingClientRect(); "
                            "return { x: r.left, y: r.top, width: r.width, height: r.height }; }")
        self.page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        self.page.wait_for_timeout(500)
        self.page.keyboard.type(text, delay=20)
        self.page.wait_for_timeout(1500)
        return self.evaluate(r"""() => Array.from(document.querySelectorAll('[role=option]'))
            .map(e => e.innerText.replace(/\s+/g, ' ').trim()).filter(Boolean)""")

    def pick_search_result(self) -> None:
        self.page.keyboard.press("Enter")
        self.page.wait_for_timeout(500)

    def click_run(self) -> int:
        """Press Run (the queue button); returns the event index from which this run's events count."""
        start = self.event_count()
        self.page.locator("button").filter(has_text=re.compile(r"^\s*Run\s*$")).first.click()
        return start

    def click_cancel(self) -> None:
        """The queue's Cancel current run button (the X next to Run): the front-end POSTs /interrupt."""
        self.page.get_by_role("button", name="Cancel current run").click()

    def refresh_node_definitions(self) -> None:
        """The R key (Comfy.RefreshNodeDefinitions: reloads /object_info and updates the combos)."""
        self.evaluate("() => document.activeElement?.blur?.()")
        with self.page.expect_response(lambda r: "/object_info" in r.url, timeout=120_000):
            self.page.keyboard.press("r")
        self.page.wait_for_timeout(1500)

    def set_setting(self, key: str, value: Any) -> None:
        self.evaluate("""async ([k, v]) => {
            const s = app.extensionManager?.setting;
            if (s?.set) await s.set(k, v); else await app.ui.settings.setSettingValueAsync(k, v); }""", [key, value])

    def wait_for_run(self, start: int, timeout_s: float, poll_s: float = 0.5, until: Any = None) -> dict:
        """Events of the run that started after event `start` until it succeeded, was interrupted or failed (or
        `until(state)` is true). Also samples the tab title (the front-end shows progress there: "[50%]")."""
        deadline = time.monotonic() + timeout_s
        titles: list[str] = []
        while True:
            events = self.events(start)
            title = self.page.title()
            if not titles or titles[-1] != title:
                titles.append(title)
            kinds = [e["type"] for e in events]
            state = {"events": events, "titles": titles, "chart": self.chart(),
                     "end": next((k for k in kinds if k in ("execution_success", "execution_interrupted",
                                                            "execution_error")), None)}
            if state["end"] or (until is not None and until(state)):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not end in {timeout_s:.0f} s; last events: {events[-5:]}")
            time.sleep(poll_s)

    def frame_node(self, node_id: Any, x: int, y: int, scale: float) -> dict:
        rect = self.evaluate(FRAME_NODE, [node_id, x, y, scale])
        self.page.wait_for_timeout(400)
        return rect

    def frame_area(self, gx: float, gy: float, scale: float) -> None:
        self.evaluate(FRAME_AREA, [gx, gy, scale])
        self.page.wait_for_timeout(400)

    def dismiss_notices(self) -> None:
        for selector in ("[data-testid=error-overlay-dismiss]", ".p-toast-close-button"):
            for button in self.page.locator(selector).all():
                with contextlib.suppress(Exception):  # a toast may close by itself meanwhile
                    button.click(timeout=2000)
