"""Headless Chromium through Playwright (Debian's `chromium` package, never a downloaded browser), the opt-in gate
of the browser tests, console collection, and the pictures for the README (docs/images)."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("LORALOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PICTURES_ENV = "LORALOOP_PICTURES"  # a folder: the tests also write their README pictures there (docs/images)
VIEWPORT = {"width": 1280, "height": 800}
PICTURE_MAX = (1280, 800)


def opt_in(request: pytest.FixtureRequest, env: str, host: str) -> Path:
    """The host checkout named by `env`; skips unless it is set AND `-m` names the `browser` marker (a plain pytest
    never starts a host or a browser, even with the variable set). Fails when asked for but unusable."""
    raw = os.environ.get(env)
    if not raw:
        pytest.skip(f"set {env} to a {host} checkout (and run with -m browser)")
    if "browser" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"starts a real {host} and Chromium: run with -m browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the browser tests need Playwright for Python: pip install playwright (do not run "
                    "`playwright install`: they use Debian's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LORALOOP_CHROMIUM)")
    return Path(raw).expanduser().resolve()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API) started from the system's binary."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Console:
    """Every console error, uncaught page error and failed (>= 400) response of one page, in order."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, text, url)

    def attach(self, page: Any) -> Console:
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.entries.append(("pageerror", f"{err}\n{err.stack or ''}", "")))
        page.on("response", lambda r: self.entries.append(("http", f"{r.status} {r.request.method}", r.url))
                if r.status >= 400 else None)
        return self

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.entries.append(("console", message.text, (message.location or {}).get("url", "")))

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int = 0) -> list[tuple[str, str, str]]:
        return self.entries[mark:]


def without(entries: list[tuple[str, str, str]], noise: list[tuple[str, str]],
            baseline: set[tuple[str, str, str]] = frozenset()) -> tuple[list, list]:
    """(entries left, entries ignored): an entry is ignored when the same page showed it without the pack
    (`baseline`) or when it matches a (kind, regex on "text url") of `noise`."""
    left, ignored = [], []
    for entry in entries:
        kind, text, url = entry
        hit = _normal(entry) in baseline or any(k == kind and re.search(p, f"{text} {url}") for k, p in noise)
        (ignored if hit else left).append(entry)
    return left, ignored


def _normal(entry: tuple[str, str, str]) -> tuple[str, str, str]:
    kind, text, url = entry
    return kind, re.sub(r":\d+(/|$)", r":PORT\1", text), re.sub(r"//127\.0\.0\.1:\d+", "//HOST", url)


def baseline_of(entries: list[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    return {_normal(e) for e in entries}


# -- screenshots and pictures ---------------------------------------------------------------------------------------
def pictures_dir() -> Path | None:
    raw = os.environ.get(PICTURES_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def small_png(png: bytes, max_size: tuple[int, int] = PICTURE_MAX, colors: int = 256) -> bytes:
    """A README-sized PNG: at most `max_size`, 256-colour palette, optimised (the UIs are flat: it stays sharp)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail(max_size, Image.LANCZOS)
        small = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out = io.BytesIO()
        small.save(out, "PNG", optimize=True)
    return out.getvalue()


@dataclass
class Shots:
    """Screenshots of one test module: every one under `folder` (a tmp dir), README pictures also under
    $LORALOOP_PICTURES when it is set."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    def take(self, page: Any, name: str, picture: str | None = None, **kwargs: Any) -> Path:
        path = self.folder / f"{len(self.taken):02d}-{name}.png"
        png = page.screenshot(path=str(path), **kwargs)
        self.taken.append(path)
        target = pictures_dir()
        if picture and target is not None:
            (target / picture).write_bytes(small_png(png))
        return path

    def safe(self, page: Any, name: str) -> None:
        """A screenshot in a teardown: never raises (the page may be gone)."""
        try:
            self.take(page, name, timeout=15_000)
        except Exception as err:
            print(f"screenshot {name} failed: {err}")
