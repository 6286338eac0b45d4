"""Debian's Chromium driven by Playwright (sync API) for tests of the page the host double serves.

Only /usr/bin/chromium is used (`make setup` installs it); Playwright never downloads a browser here.
Each `Browser` runs headless with a fresh temporary profile. Requests that leave 127.0.0.1 are
answered in the browser with an empty body and recorded in `external_requests` (gradio's page asks
a CDN for iframeResizer), and the resolver maps every other host name to nothing, so nothing leaves
the machine. Console errors and uncaught page errors are collected in `errors`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


class ChromiumMissing(RuntimeError):
    pass


def require_chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise ChromiumMissing(f"{CHROMIUM} is missing: run `make setup`, which installs Debian's chromium")
    return CHROMIUM


class Browser:
    """`with Browser() as b: b.page.goto(url)`; `b.errors` lists console errors and page errors."""

    def __init__(self, viewport: tuple[int, int] = (1400, 1000)) -> None:
        self.viewport = viewport
        self.errors: list[str] = []
        self.external_requests: list[str] = []
        self._profile: str | None = None
        self._playwright = None
        self.context = None
        self.page = None

    def __enter__(self) -> Browser:
        executable = require_chromium()
        # the sync API never downloads; this keeps any helper it spawns from trying either
        os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        from playwright.sync_api import sync_playwright

        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self._playwright = sync_playwright().start()
        try:
            self.context = self._playwright.chromium.launch_persistent_context(
                self._profile, executable_path=executable, headless=True, args=ARGS,
                viewport={"width": self.viewport[0], "height": self.viewport[1]},
            )
            self.context.route(lambda url: urlsplit(url).hostname not in LOCAL_HOSTS
                               and urlsplit(url).scheme in ("http", "https", "ws", "wss"), self._answer_external)
            self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
            self.page.on("console", self._on_console)
            self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _answer_external(self, route) -> None:
        self.external_requests.append(route.request.url)
        kind = route.request.resource_type
        content_type = {"script": "application/javascript", "stylesheet": "text/css"}.get(kind, "text/plain")
        route.fulfill(status=200, body="", content_type=content_type)

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text} ({message.location.get('url', '')})")

    def __exit__(self, *exc) -> None:
        try:
            if self.context is not None:
                self.context.close()
        finally:
            self.context = self.page = None
            if self._playwright is not None:
                self._playwright.stop()
                self._playwright = None
            if self._profile is not None:
                shutil.rmtree(self._profile, ignore_errors=True)
                self._profile = None


def choose_script(page, title: str) -> None:
    """Pick `title` in txt2img's Script dropdown (gradio 3.41's list of options)."""
    page.click("#script_list input")
    page.click(f"#script_list ul.options li[data-value='{title}']")


def send_to_txt2img(page, infotext: str) -> None:
    """PNG Info -> "Send to txt2img" with `infotext` as the image's parameters."""
    page.click("#tabs > .tab-nav > button:has-text('PNG Info')")
    page.wait_for_function("get_uiCurrentTab().textContent.trim() === 'PNG Info'")
    page.evaluate("""text => {
        const box = gradioApp().querySelector('#pnginfo_generation_info textarea');
        box.value = text;
        updateInput(box);
    }""", infotext)
    page.click("#txt2img_tab")


def pick_option(page, elem_id: str, value: str, timeout: float = 60.0, *, choose: bool = True) -> None:
    """Choose `value` in a gradio dropdown whose choices may still be on their way from the server
    (the list shows the choices it had when it opened, so reopen it until the option is there);
    with `choose=False` only wait until it is listed."""
    import time

    option = page.locator(f"#{elem_id} ul.options li[data-value='{value}']")
    deadline = time.monotonic() + timeout
    while True:
        page.click(f"#{elem_id} input")
        if option.count():
            if choose:
                option.click()
            else:
                page.mouse.click(2, 2)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{value!r} never appeared in #{elem_id}")
        page.mouse.click(2, 2)  # close the list (not Escape: the host's script.js then fails off txt2img)
        page.wait_for_timeout(500)


def css_rgb(color: str) -> tuple[float, float, float]:
    """'rgb(r, g, b)' or 'rgba(r, g, b, a)' as getComputedStyle writes it (opaque here)."""
    return tuple(float(v) for v in color[color.index("(") + 1:-1].split(",")[:3])


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""
    def luminance(rgb: tuple[float, float, float]) -> float:
        lin = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def swatch_colors(page) -> list[tuple[str, str]]:
    """(text colour, background colour) of each region's number in the list."""
    return [tuple(c) for c in page.evaluate("""() => Array.from(
        gradioApp().querySelectorAll('.mos-region .mos-swatch'),
        b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor])""")]
