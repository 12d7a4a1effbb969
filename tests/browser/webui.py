"""A page driver for the AUTOMATIC1111 / Forge web UI (Gradio 3.41 / 4.40) and the LoRA Loop tab (a1111/ui.py,
javascript/loraloop.js). Widgets are found by the elem_id the tab gives them (`loraloop_<config key>`), the webui's
own ones by theirs (`txt2img_prompt`, `txt2img_generate`, …)."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

READY = "() => typeof gradioApp === 'function' && !!gradioApp().querySelector('#tab_loraloop')"

# Console errors of the webui itself, not of LoRA Loop: Gradio's iframe-resizer script comes from a CDN that a machine
# without internet cannot reach.
WEBUI_NOISE = [
    ("console", r"net::ERR_NAME_NOT_RESOLVED .*https://cdnjs\.cloudflare\.com/"),
    ("console", r"net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|CONNECTION_REFUSED) https://"),
    # Forge Classic (Gradio 4.40): every txt2img Generate throws this in Gradio's Blocks-*.js, with or without
    # LoRA Loop installed (seen on a webui with no extension added)
    ("pageerror", r"^Cannot read properties of undefined \(reading 'props'\)[\s\S]*/assets/Blocks-"),
]

VALUE = r"""(id) => {
  const root = gradioApp().getElementById(id);
  if (!root) return { missing: true };
  const box = root.querySelector('input[type=checkbox]');
  if (box) return { kind: 'checkbox', value: box.checked };
  const field = root.querySelector('textarea, input[type=number], input:not([type=range])');
  return { kind: field?.type ?? field?.tagName, value: field?.value ?? null,
           label: root.querySelector('[data-testid=block-info], label span, span')?.textContent ?? null,
           title: root.querySelector('[data-testid=block-info], label span, span')?.title ?? null };
}"""

PROGRESS = r"""() => {
  const bar = gradioApp().querySelector('#loraloop_progressbar .progressDiv, #loraloop_progress .progressDiv');
  const inner = bar?.querySelector('.progress');
  const status = gradioApp().querySelector('#loraloop_status textarea');
  return { bar: !!bar, width: inner?.style?.width ?? null, text: (inner ?? bar)?.innerText ?? null,
           status: status?.value ?? null };
}"""


class WebuiPage:
    """One tab of the webui, on the LoRA Loop tab unless told otherwise."""

    def __init__(self, browser: Any, url: str, console: Any) -> None:
        self.url, self.console = url, console
        self.context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        self.page = self.context.new_page()
        console.attach(self.page)

    def open(self, timeout_s: float = 300) -> WebuiPage:
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_function(READY, timeout=timeout_s * 1000)
        self.page.wait_for_load_state("networkidle", timeout=timeout_s * 1000)
        self.page.wait_for_timeout(1500)  # onUiLoaded callbacks (our hints) run after the first render
        return self

    def close(self) -> None:
        self.context.close()

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def tab(self, name: str) -> None:
        self.page.locator("#tabs > .tab-nav button, #tabs .tab-nav button").filter(
            has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")).first.click()
        self.page.wait_for_timeout(500)

    def el(self, elem_id: str) -> Any:
        return self.page.locator(f"#{elem_id}")

    # -- the tab's widgets -------------------------------------------------------------------------------------------
    def value(self, name: str) -> dict:
        return self.evaluate(VALUE, f"loraloop_{name}")

    def set(self, name: str, value: Any) -> None:
        """Type a value into field `name` as a user would (and leave the field, which commits it)."""
        root = self.el(f"loraloop_{name}")
        root.scroll_into_view_if_needed()
        box = root.locator("input[type=checkbox]")
        if box.count():
            box.set_checked(bool(value))
            return
        field = root.locator("textarea, input[type=number], input:not([type=range])").first
        if "gradio-dropdown" in (root.get_attribute("class") or ""):  # open the list, click the choice
            field.click()
            self.page.locator("ul.options li").filter(  # the list is drawn outside the widget
                has_text=re.compile(rf"^\s*(✓\s*)?{re.escape(str(value))}\s*$")).first.click()
            self.page.wait_for_timeout(200)
            return
        field.fill(str(value))
        field.press("Tab")

    def open_accordions(self) -> None:
        """Open every closed accordion of the tab (a user opens the one they need; all keeps the test simple)."""
        for _ in range(30):
            closed = self.page.locator("#tab_loraloop .label-wrap:not(.open)")
            if not closed.count():
                return
            closed.first.scroll_into_view_if_needed()
            closed.first.click()
            self.page.wait_for_timeout(200)

    def text(self, elem_id: str) -> str:
        return self.evaluate("""(id) => { const r = gradioApp().getElementById(id);
            const f = r?.querySelector('textarea'); return f ? f.value : (r?.innerText ?? ''); }""", elem_id)

    def click(self, elem_id: str) -> None:
        button = self.el(elem_id)
        button.scroll_into_view_if_needed()
        button.click()

    def wait_text(self, elem_id: str, pattern: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text(elem_id)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"#{elem_id} did not show /{pattern}/ in {timeout_s:.0f} s; it shows {text!r}")
            time.sleep(0.5)

    def scroll_to(self, elem_id: str, above: int = 0) -> None:
        self.evaluate("""([id, above]) => { const r = gradioApp().getElementById(id).getBoundingClientRect();
            window.scrollTo(0, r.top + scrollY - above); }""", [elem_id, above])
        self.page.wait_for_timeout(300)

    def section_clip(self, first_id: str, last_id: str, margin: int = 50) -> dict:
        """Screenshot arguments for the page from the heading above `first_id` to the bottom of `last_id`."""
        box = self.evaluate("""([a, b]) => { const A = gradioApp().getElementById(a).getBoundingClientRect(),
            B = gradioApp().getElementById(b).getBoundingClientRect();
            return { top: A.top + scrollY, bottom: B.bottom + scrollY, width: document.body.clientWidth }; }""",
                            [first_id, last_id])
        top = max(0, box["top"] - margin)
        return {"full_page": True, "clip": {"x": 0, "y": top, "width": box["width"],
                                            "height": box["bottom"] - top + 10}}

    def progress(self) -> dict:
        return self.evaluate(PROGRESS)

    # -- txt2img ---------------------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, *, seed: int, size: int, steps: int, timeout_s: float = 600) -> bytes:
        """Type the prompt and settings into txt2img, press Generate: the PNG bytes of the image shown."""
        self.tab("txt2img")
        self.page.locator("#txt2img_prompt textarea").fill(prompt)
        for elem_id, value in (("txt2img_width", size), ("txt2img_height", size), ("txt2img_steps", steps),
                               ("txt2img_seed", seed)):
            field = self.page.locator(f"#{elem_id} input[type=number]").first
            field.fill(str(value))
            field.press("Tab")
        before = self._gallery_sources()
        self.page.locator("#txt2img_generate").click()
        deadline = time.monotonic() + timeout_s
        while True:
            sources = self._gallery_sources()
            busy = self.evaluate("() => !!gradioApp().querySelector('#txt2img_results .progressDiv, "
                                 "#txt2img_interrupt[style*=\"block\"]')")
            if sources and sources != before and not busy:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"txt2img showed no new image in {timeout_s:.0f} s")
            time.sleep(0.5)
        return self._fetch(sources[0])

    def _gallery_sources(self) -> list[str]:
        return self.evaluate("""() => Array.from(gradioApp().querySelectorAll('#txt2img_gallery img'))
            .map(i => i.src).filter(s => s && !s.startsWith('data:image/svg'))""")

    def _fetch(self, src: str) -> bytes:
        if src.startswith("data:"):
            return base64.b64decode(src.split(",", 1)[1])
        data = self.evaluate("""async (src) => { const r = await fetch(src); const b = new Uint8Array(await
            r.arrayBuffer()); let s = ''; for (const c of b) s += String.fromCharCode(c); return btoa(s); }""", src)
        return base64.b64decode(data)
