"""The region canvas (javascript/mix_of_show*.js) in a real browser: the host double serves the
txt2img page with this extension's javascript and style.css exactly as A1111 v1.10.1 injects them,
and headless Debian Chromium is driven with mouse and keyboard events.

The JSON textbox is what the host submits, pastes and saves, so every check reads it back and
parses it with lib_mos.regional.regions, the module that turns it into attention masks at generation time.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from browser import choose_script, contrast, css_rgb, send_to_txt2img, swatch_colors
from PIL import Image, ImageDraw

from lib_mos.regional.regions import RegionSpec, layer_masks, region_masks

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ROOT / "outputs"
JSON_BOX = "#script_mixofshow_regions textarea"
CANVAS = ".mos-canvas canvas.mos-surface"
BACKGROUND = (31, 31, 36)  # the canvas' empty colour (#1f1f24)
BOX_ALPHA, BOX_SELECTED_ALPHA = 0.3, 0.45
PAINT_ALPHA, PAINT_SELECTED_ALPHA = 110 / 255, 170 / 255
PAPER = (235, 232, 222)  # the reference sketch's background


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """The host double's page with this repository loaded as an extension."""
    from host_harness import HostHarness

    harness = HostHarness(tmp_path_factory.mktemp("data"), tiny_checkpoint, extensions=[str(ROOT)])
    try:
        harness.serve()
        yield harness
    finally:
        harness.close()


class Canvas:
    """Drives the canvas in image pixels (the generation's width x height)."""

    def __init__(self, page, width: int, height: int) -> None:
        self.page, self.width, self.height = page, width, height

    def box(self) -> dict:
        return self.page.locator(CANVAS).bounding_box()

    def at(self, x: float, y: float) -> tuple[float, float]:
        b = self.box()
        return b["x"] + x * b["width"] / self.width, b["y"] + y * b["height"] / self.height

    def show(self) -> None:
        """Scrolls the whole canvas into view, as a user does: the region list is below it, so typing
        there may have scrolled part of the canvas away, and the mouse only reaches what is shown."""
        self.page.locator(CANVAS).scroll_into_view_if_needed()

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 10) -> None:
        self.show()
        mouse = self.page.mouse
        mouse.move(*self.at(*start))
        mouse.down()
        mouse.move(*self.at(*end), steps=steps)
        mouse.up()

    def click(self, x: float, y: float) -> None:
        self.show()
        self.page.mouse.click(*self.at(x, y))

    def rgb(self, x: float, y: float) -> tuple[int, int, int]:
        """The rendered pixel under image point (x, y), read from the canvas itself."""
        return tuple(self.page.evaluate("""([selector, x, y, W, H]) => {
            const c = gradioApp().querySelector(selector);
            const d = c.getContext('2d').getImageData(Math.floor(x * c.width / W), Math.floor(y * c.height / H), 1, 1).data;
            return [d[0], d[1], d[2]];
        }""", [CANVAS, x, y, self.width, self.height]))


def spec_json(page) -> dict:
    text = page.locator(JSON_BOX).input_value()
    return json.loads(text) if text else {}


def wait_json(page, predicate_js: str) -> dict:
    """Wait until the textbox's JSON satisfies `predicate_js` (a JS expression over `spec`)."""
    page.wait_for_function(f"""() => {{
        const text = gradioApp().querySelector('{JSON_BOX}').value;
        if (!text) return false;
        const spec = JSON.parse(text);
        return {predicate_js};
    }}""")
    return spec_json(page)


def mask_pixels(data_url: str) -> np.ndarray:
    """[H, W] 0xRRGGBB of a mask_image."""
    raw = base64.b64decode(data_url.split(",", 1)[1])
    rgb = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def hex_rgb(color: str) -> tuple[int, int, int]:
    v = int(color[1:], 16)
    return v >> 16, (v >> 8) & 255, v & 255


def tint(color: str, alpha: float, under: tuple[int, int, int] = BACKGROUND) -> tuple[int, int, int]:
    return tuple(round(b + alpha * (c - b)) for b, c in zip(under, hex_rgb(color)))


def assert_close(got, want, tol: int = 3) -> None:
    assert all(abs(g - w) <= tol for g, w in zip(got, want)), f"rendered {got}, expected about {want}"


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def open_script(page, harness) -> None:
    page.set_default_timeout(15_000)
    page.goto(harness.url)
    page.wait_for_selector("#script_list input")
    choose_script(page, "Mix-of-Show")
    page.wait_for_selector(CANVAS, state="visible")
    page.locator(CANVAS).scroll_into_view_if_needed()


def reference_sketch(width: int, height: int) -> Image.Image:
    """A pose-like sketch to trace: two stick figures and a horizon."""
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    draw.line((0, height * 0.8, width, height * 0.8), fill=(120, 120, 120), width=3)
    for cx in (width * 0.3, width * 0.72):
        draw.ellipse((cx - 26, 70, cx + 26, 122), outline=(40, 40, 40), width=4)
        draw.line((cx, 122, cx, 290), fill=(40, 40, 40), width=5)
        draw.line((cx - 60, 170, cx + 60, 170), fill=(40, 40, 40), width=5)
        draw.line((cx, 290, cx - 45, 400), fill=(40, 40, 40), width=5)
        draw.line((cx, 290, cx + 45, 400), fill=(40, 40, 40), width=5)
    return image


def test_draw_two_boxes_and_a_stroke(served, browser_page, tmp_path):
    """Mouse-drawn boxes and a brush stroke become the region JSON lib_mos reads; the mask holds
    the stroke's pixels; the canvas renders each region in its colour; Delete, undo and arrows act
    on the selected region."""
    page = browser_page.page
    open_script(page, served)
    canvas = Canvas(page, 512, 512)
    sketch = tmp_path / "sketch.png"
    reference_sketch(512, 512).save(sketch)
    page.set_input_files(".mos-canvas input.mos-reference-input", str(sketch))
    page.wait_for_selector(".mos-canvas button:has-text('✕ Reference')", state="visible")

    canvas.drag((64, 32), (256, 480))  # x, y in image pixels
    page.fill(".mos-region[data-index='0'] .mos-prompt", "a photo of <cat1> <cat2>")
    canvas.drag((288, 40), (480, 224))
    page.fill(".mos-region[data-index='1'] .mos-prompt", "a <dog1> <dog2> on a sofa")
    page.fill(".mos-region[data-index='1'] .mos-negative", "blurry")
    page.click(".mos-canvas button:has-text('Brush')")  # region 2 is a box, so the stroke starts region 3
    assert page.input_value(".mos-canvas input[type=range]") == "24"
    canvas.drag((320, 320), (448, 320), steps=16)
    spec = wait_json(page, "spec.regions.length === 3 && !!spec.mask_image")
    page.fill(".mos-region[data-index='2'] .mos-prompt", "a red ball")
    spec = wait_json(page, "spec.regions[2].prompt === 'a red ball'")

    assert spec["regions"][0] == {"prompt": "a photo of <cat1> <cat2>", "box": [0.0625, 0.125, 0.9375, 0.5],
                                  "units": "fraction"}
    assert spec["regions"][1] == {"prompt": "a <dog1> <dog2> on a sofa", "negative": "blurry",
                                  "box": [0.078125, 0.5625, 0.4375, 0.9375], "units": "fraction"}
    color = spec["regions"][2]["color"]
    assert spec["regions"][2] == {"prompt": "a red ball", "color": color}
    assert set(spec) == {"regions", "mask_image", "passes"} and spec["passes"] is True  # a new drawing: passes

    pixels = mask_pixels(spec["mask_image"])
    assert pixels.shape == (512, 512)
    assert set(np.unique(pixels)) == {0, int(color[1:], 16)}  # exact colours, no antialiasing
    painted = pixels != 0
    assert painted[320, 330:440].all() and painted[312:329, 384].all()  # along the stroke, 24 px wide
    assert not painted[:300].any() and not painted[340:].any() and not painted[:, :300].any()
    assert not painted[:, 470:].any()
    assert abs(int(painted.sum()) - (128 * 24 + 452)) < 150  # a 24 px brush swept over 128 px

    parsed = RegionSpec.from_json(json.dumps(spec))  # what the script will get from the host
    latent = region_masks(parsed, 512, 512)
    assert latent[0].sum() == 56 * 24 and latent[0][4:60, 8:32].all()  # rows 32..480, columns 64..256
    assert latent[2][40, 41:55].all() and latent[2].sum() < 70
    assert len(layer_masks(parsed, 512, 512)) == 16

    # rendered: each region tinted in its colour (the selected one stronger) over the reference
    page.click(".mos-region[data-index='2'] .mos-swatch")
    assert_close(canvas.rgb(440, 320), tint(color, PAINT_SELECTED_ALPHA, under=PAPER))
    page.click(".mos-canvas button:has-text('✕ Reference')")
    assert_close(canvas.rgb(440, 320), tint(color, PAINT_SELECTED_ALPHA))
    assert_close(canvas.rgb(160, 256), tint("#e6194b", BOX_ALPHA))
    assert_close(canvas.rgb(500, 500), BACKGROUND)

    # keyboard: select box 2 on the canvas, nudge it, delete it, undo twice, undo the stroke
    page.focus(CANVAS)  # shortcuts act while focus is in the canvas UI, never in the host's prompts
    page.keyboard.press("b")
    canvas.click(384, 128)
    assert page.get_attribute(".mos-region[data-index='1']", "aria-selected") == "true"
    assert_close(canvas.rgb(384, 128), tint("#3cb44b", BOX_SELECTED_ALPHA))
    before = page.locator(JSON_BOX).input_value()
    page.keyboard.press("ArrowDown")
    assert wait_json(page, "spec.regions[1].box[0] !== 0.078125")["regions"][1]["box"] == [
        0.09375, 0.5625, 0.453125, 0.9375]
    page.keyboard.press("Delete")
    assert [r["prompt"] for r in wait_json(page, "spec.regions.length === 2")["regions"]] == [
        "a photo of <cat1> <cat2>", "a red ball"]
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+z")
    page.wait_for_function(f"gradioApp().querySelector('{JSON_BOX}').value === {json.dumps(before)}")
    page.keyboard.press("Control+z")  # the stroke, and the region it started
    spec = wait_json(page, "spec.regions.length === 2")
    assert "mask_image" not in spec and spec["regions"][0]["box"] == [0.0625, 0.125, 0.9375, 0.5]
    assert_close(canvas.rgb(384, 320), BACKGROUND)
    page.keyboard.press("Control+Shift+z")
    assert wait_json(page, "spec.regions.length === 3")["mask_image"] == json.loads(before)["mask_image"]

    page.set_input_files(".mos-canvas input.mos-reference-input", str(sketch))
    page.click(".mos-region[data-index='0'] .mos-swatch")
    page.mouse.move(0, 0)
    OUTPUTS.mkdir(exist_ok=True)
    page.locator("#txt2img_script_container").screenshot(path=str(OUTPUTS / "region-canvas.png"))
    served.wait_idle()  # gradio's events for the typing above end before the browser leaves
    assert browser_page.errors == []


def test_region_list_is_wide_enough_to_type_in_and_numbers_read_on_every_colour(served, browser_page):
    """At the default viewport the region prompts are multi-line boxes at least 300 px wide (the
    list once was a 160 px column beside the canvas), and every region's number has WCAG AA
    contrast (4.5:1) on its colour: all 16 palette colours, and painted colours of any lightness."""
    page = browser_page.page
    open_script(page, served)
    boxes = {"regions": [{"prompt": f"region {i + 1}", "box": [0, i / 16, 1, (i + 1) / 16], "units": "fraction"}
                         for i in range(16)]}
    page.fill(JSON_BOX, json.dumps(boxes))
    page.wait_for_selector(".mos-region[data-index='15']")
    prompt = page.locator(".mos-region[data-index='0'] .mos-prompt")
    assert prompt.evaluate("e => e.tagName") == "TEXTAREA"
    assert prompt.bounding_box()["width"] >= 300, prompt.bounding_box()
    assert page.locator(".mos-region[data-index='0'] .mos-negative").bounding_box()["width"] >= 300
    line = prompt.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)")
    assert prompt.bounding_box()["height"] >= 2 * line  # two lines shown before any typing

    colors = swatch_colors(page)
    assert len({bg for _, bg in colors}) == 16
    low = {bg: round(contrast(css_rgb(fg), css_rgb(bg)), 2) for fg, bg in colors
           if contrast(css_rgb(fg), css_rgb(bg)) < 4.5}
    assert not low, f"region numbers below 4.5:1 on {low}"

    # painted regions keep the mask's colours, whatever they are: white, yellow, mid grey, black
    painted = ["#ffffff", "#ffff00", "#767676", "#777777", "#000000", "#0000ff"]
    mask = Image.new("RGB", (len(painted), 1))
    for x, color in enumerate(painted):
        mask.putpixel((x, 0), hex_rgb(color))
    page.fill(JSON_BOX, json.dumps({"regions": [{"prompt": c, "color": c} for c in painted],
                                    "mask_image": png_data_url(mask)}))
    page.wait_for_function("gradioApp().querySelectorAll('.mos-region').length === 6")
    colors = swatch_colors(page)
    assert [css_rgb(bg) for _, bg in colors] == [hex_rgb(c) for c in painted]
    assert all(contrast(css_rgb(fg), css_rgb(bg)) >= 4.5 for fg, bg in colors), colors
    served.wait_idle()
    assert browser_page.errors == []


def test_json_edits_paste_and_tabs_redraw_the_canvas(served, browser_page, tmp_path):
    """Typing JSON, pasting infotext through PNG Info's "Send to txt2img" (which also moves the size
    sliders) and switching tabs redraw the canvas; masks upload and download colour-coded."""
    page = browser_page.page
    open_script(page, served)
    canvas = Canvas(page, 512, 512)
    mask = Image.new("RGB", (256, 256))  # any resolution: it covers the whole image
    ImageDraw.Draw(mask).ellipse((128, 128, 192, 192), fill="#00ff00")
    typed = {"regions": [{"prompt": "a <cat1> <cat2>", "box": [64, 32, 256, 224]},
                         {"prompt": "grass", "negative": "snow", "color": "#00ff00"}],
             "mask_image": png_data_url(mask), "feather": 1.5}
    page.fill(JSON_BOX, json.dumps(typed))
    page.wait_for_selector(".mos-region[data-index='1']")
    page.wait_for_function(f"""() => {{
        const c = gradioApp().querySelector('{CANVAS}');
        const d = c.getContext('2d').getImageData(Math.floor(c.width * 0.625), Math.floor(c.height * 0.625), 1, 1).data;
        return d[1] > 100;
    }}""")  # the mask decodes asynchronously
    assert_close(canvas.rgb(128, 160), tint("#e6194b", BOX_ALPHA))  # px box [top 64, left 32, ...]
    assert_close(canvas.rgb(320, 320), tint("#00ff00", PAINT_ALPHA))  # the circle, mask scaled 2x
    assert_close(canvas.rgb(40, 40), BACKGROUND)
    assert page.input_value(".mos-region[data-index='1'] .mos-negative") == "snow"
    assert page.input_value(".mos-canvas .mos-feather") == "1.5"
    assert page.locator(JSON_BOX).input_value() == json.dumps(typed)  # shown, not rewritten

    # an edit on the canvas keeps what it did not touch: px units, the mask as written, feather, one pass
    page.fill(".mos-region[data-index='0'] .mos-prompt", "a <cat1> <cat2> sleeping")
    spec = wait_json(page, "spec.regions[0].prompt.endsWith('sleeping')")
    assert spec == {**typed, "regions": [{**typed["regions"][0], "prompt": "a <cat1> <cat2> sleeping"},
                                         typed["regions"][1]]}

    page.fill(JSON_BOX, '{"regions": [')  # half-typed JSON: said, and the drawing stays
    page.wait_for_selector(".mos-status.mos-error")
    assert "not shown" in page.inner_text(".mos-status")
    assert page.locator(".mos-region").count() == 2

    # PNG Info -> Send to txt2img: sliders to 768x512, the script selected, the regions pasted
    from modules.infotext_utils import quote

    pasted = {"regions": [{"prompt": "a <dog1> <dog2>", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
    infotext = (f"a living room\nNegative prompt: blurry\nSteps: 20, Size: 768x512, Script: Mix-of-Show, "
                f"Mix-of-Show regions: {quote(json.dumps(pasted))}")
    send_to_txt2img(page, infotext)
    page.wait_for_function("gradioApp().querySelectorAll('.mos-region').length === 1")
    box = canvas.box()
    assert abs(box["width"] / box["height"] - 1.5) < 0.01
    canvas = Canvas(page, 768, 512)
    assert page.input_value(".mos-region[data-index='0'] .mos-prompt") == "a <dog1> <dog2>"
    assert_close(canvas.rgb(600, 256), tint("#e6194b", BOX_ALPHA))
    assert_close(canvas.rgb(200, 256), BACKGROUND)
    assert json.loads(page.locator(JSON_BOX).input_value()) == pasted

    # another tab and back: the same drawing, laid out again at its size
    page.click("#tabs > .tab-nav > button:has-text('img2img')")
    page.click("#tabs > .tab-nav > button:has-text('txt2img')")
    page.wait_for_selector(CANVAS, state="visible")
    assert_close(canvas.rgb(600, 256), tint("#e6194b", BOX_ALPHA))

    # a colour-coded mask upload: one painted region per colour, boxes keep theirs
    upload = Image.new("RGB", (768, 512))
    draw = ImageDraw.Draw(upload)
    draw.rectangle((0, 0, 191, 255), fill="#ff8800")
    draw.rectangle((0, 256, 191, 511), fill="#0088ff")
    upload.save(tmp_path / "mask.png")
    page.set_input_files(".mos-canvas input.mos-mask-input", str(tmp_path / "mask.png"))
    spec = wait_json(page, "spec.regions.length === 3")
    assert [r.get("color") for r in spec["regions"]] == [None, "#ff8800", "#0088ff"]
    pixels = mask_pixels(spec["mask_image"])
    assert pixels.shape == (512, 768) and pixels[100, 100] == 0xFF8800 and pixels[400, 100] == 0x0088FF
    assert pixels[100, 400] == 0
    with page.expect_download() as download:
        page.click(".mos-canvas button:has-text('Download mask')")
    saved = tmp_path / "downloaded.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "mix-of-show-mask-768x512.png"
    every = mask_pixels(png_data_url(Image.open(saved)))
    assert every[100, 100] == 0xFF8800 and every[400, 100] == 0x0088FF and every[256, 600] == 0xE6194B
    assert every[256, 300] == 0
    served.wait_idle()
    assert browser_page.errors == []
