"""The region canvas' per-region LoRA picker and global prompt weights (javascript/mix_of_show.js
and javascript/mix_of_show_loras.js) in a real browser, on the host double's txt2img page.

The LoRA list comes from the extension's route GET /mix-of-show/loras over the served harness'
Lora folder (models/Lora, the host's --lora-dir), filled here with small files: kohya-keyed LoRAs
and one of our concept files (it has tokens). Every check reads the JSON textbox back, and the
final JSON is parsed with lib_mos.regional.regions as the script parses it at generation time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_region_canvas import JSON_BOX, Canvas, open_script, spec_json, wait_json

from lib_mos.concepts.files import METADATA_KEY
from lib_mos.regional.regions import PASS_UNET_WEIGHT, LoraRef, RegionSpec

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ROOT / "outputs"
HINT = "0 = inside a region only its prompt counts"
# (path in the Lora folder, tokens: a concept file of ours when given, else an ordinary kohya LoRA)
LORAS = [
    ("chars/potter.safetensors", ("<potter1>", "<potter2>")),
    ("chars/hermione.safetensors", ()),
    ("styles/watercolor.safetensors", ()),
    ("Background-Forest.safetensors", ()),
]
NAMES = ["Background-Forest", "hermione", "potter", "watercolor"]  # the route sorts case-insensitively


def write_lora(path: Path, tokens: tuple[str, ...] = ()) -> Path:
    """A small valid .safetensors in kohya's key layout; with tokens, tagged as our concept format
    (the route lists a file's tokens from that header, without reading the tensors)."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{stem}.lora_down.weight": torch.zeros(2, 8), f"{stem}.lora_up.weight": torch.zeros(8, 2),
               f"{stem}.alpha": torch.tensor(2.0)}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "2"}
    if tokens:
        metadata[METADATA_KEY] = json.dumps({"format": "mos-concept", "version": 1, "tokens": list(tokens)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """The host double's page with this repository as an extension and LORAS in its Lora folder."""
    from host_harness import HostHarness

    from modules import shared

    harness = HostHarness(tmp_path_factory.mktemp("data"), tiny_checkpoint, extensions=[str(ROOT)])
    try:
        harness.lora_dir = Path(shared.cmd_opts.lora_dir)
        for rel, tokens in LORAS:
            write_lora(harness.lora_dir / rel, tokens)
        harness.serve()
        yield harness
    finally:
        harness.close()


def region(i: int) -> str:
    return f".mos-region[data-index='{i}']"


def open_picker(page, i: int) -> None:
    """Open region i's LoRA list and wait until the folder's list (or a message) is in."""
    page.click(f"{region(i)} .mos-lora-add")
    page.wait_for_selector(f"{region(i)} .mos-lora-picker", state="visible")
    page.wait_for_function(f"""() => {{
        const p = gradioApp().querySelector("{region(i)} .mos-lora-picker");
        const m = p.querySelector('.mos-lora-message');
        return p.querySelector('.mos-lora-option') || (!m.hidden && !m.textContent.startsWith('Reading'));
    }}""")


def listed(page, i: int) -> list[str]:
    return page.eval_on_selector_all(f"{region(i)} .mos-lora-option", "els => els.map(e => e.dataset.name)")


def chips(page, i: int) -> list[str]:
    return page.eval_on_selector_all(f"{region(i)} .mos-lora", "els => els.map(e => e.dataset.name)")


def search(page, i: int, text: str) -> list[str]:
    page.fill(f"{region(i)} .mos-lora-search", text)
    return listed(page, i)


def pick(page, i: int, name: str, query: str | None = None) -> None:
    open_picker(page, i)
    if query is not None:
        search(page, i, query)
    page.click(f"{region(i)} .mos-lora-option[data-name='{name}']")
    page.wait_for_selector(f"{region(i)} .mos-lora-picker", state="hidden")


def weight_input(i: int, name: str) -> str:
    return f"{region(i)} .mos-lora[data-name='{name}'] .mos-lora-weight"


def loras_of(spec: dict) -> list:
    return [r.get("loras") for r in spec["regions"]]


def draw_two_boxes(page) -> None:
    canvas = Canvas(page, 512, 512)
    canvas.drag((16, 16), (240, 496))
    page.fill(f"{region(0)} .mos-prompt", "a photo of <potter1> <potter2>")
    canvas.drag((272, 16), (496, 496))
    page.fill(f"{region(1)} .mos-prompt", "a witch in a library")
    wait_json(page, "spec.regions.length === 2 && spec.regions[1].prompt === 'a witch in a library'")


def test_route_lists_the_lora_folder(served, browser_page):
    """What the picker gets: every file of the folder by name, its path and concept tokens."""
    page = browser_page.page
    open_script(page, served)
    answer = page.evaluate("fetch('mix-of-show/loras').then(r => r.json())")
    assert answer == {"family": "sd1", "loras": [
        {"name": "Background-Forest", "path": "Background-Forest.safetensors", "tokens": []},
        {"name": "hermione", "path": "chars/hermione.safetensors", "tokens": []},
        {"name": "potter", "path": "chars/potter.safetensors", "tokens": ["<potter1>", "<potter2>"]},
        {"name": "watercolor", "path": "styles/watercolor.safetensors", "tokens": []},
    ]}
    assert browser_page.errors == []


def test_pick_search_weight_remove_and_global_weights(served, browser_page):
    """LoRAs picked in a region land in that region's JSON; the search filters by name and path; the
    weight and the removal edit the JSON; the spec's and a region's global prompt weight are written
    as lib_mos reads them; undoing a shape keeps them (they are typed, like prompts)."""
    page = browser_page.page
    open_script(page, served)
    draw_two_boxes(page)

    # the list: every file, sorted, with its path and tokens
    open_picker(page, 1)
    assert listed(page, 1) == NAMES
    potter = page.locator(f"{region(1)} .mos-lora-option[data-name='potter']")
    assert "chars/potter.safetensors" in potter.inner_text() and "<potter1> <potter2>" in potter.inner_text()
    assert page.locator(f"{region(0)} .mos-lora-picker").is_hidden()  # only region 2's list opened
    # the filter: case-insensitive substrings of the name or the path
    assert search(page, 1, "CHARS/") == ["hermione", "potter"]  # path only
    assert search(page, 1, "forest") == ["Background-Forest"]  # name, other case
    assert search(page, 1, "Styles") == ["watercolor"]
    assert search(page, 1, "tt") == ["potter"]
    assert search(page, 1, "<potter1>") == []  # tokens are not searched, name and path are
    assert search(page, 1, "nothing-like-this") == []
    assert "No LoRA in the Lora folder matches" in page.inner_text(f"{region(1)} .mos-lora-message")
    assert search(page, 1, "") == NAMES
    page.click(f"{region(1)} .mos-lora-option[data-name='potter']")
    spec = wait_json(page, "!!spec.regions[1].loras")
    assert loras_of(spec) == [None, [{"name": "potter", "weight": 1}]]
    assert chips(page, 1) == ["potter"] and chips(page, 0) == []
    assert page.locator(f"{region(1)} .mos-lora-picker").is_hidden()

    # region 1 by keyboard: filter, arrows, Enter
    open_picker(page, 0)
    assert search(page, 0, "er") == ["hermione", "potter", "watercolor"]
    page.keyboard.press("ArrowDown")  # from the first to the second
    page.keyboard.press("Enter")
    spec = wait_json(page, "!!spec.regions[0].loras")
    assert loras_of(spec) == [[{"name": "potter", "weight": 1}], [{"name": "potter", "weight": 1}]]

    # a LoRA already in the region is offered but cannot be added twice
    open_picker(page, 1)
    taken = page.locator(f"{region(1)} .mos-lora-option[data-name='potter']")
    assert taken.get_attribute("aria-disabled") == "true" and "added" in taken.inner_text()
    taken.click(force=True)  # aria-disabled: nothing happens
    page.keyboard.press("Escape")
    page.wait_for_selector(f"{region(1)} .mos-lora-picker", state="hidden")
    assert loras_of(spec_json(page))[1] == [{"name": "potter", "weight": 1}]

    # weights: any finite number; what is no number is not written
    page.fill(weight_input(1, "potter"), "0.75")
    assert wait_json(page, "spec.regions[1].loras[0].weight === 0.75")["regions"][1]["loras"] == [
        {"name": "potter", "weight": 0.75}]
    page.fill(weight_input(1, "potter"), "-1.5")
    wait_json(page, "spec.regions[1].loras[0].weight === -1.5")
    assert page.get_attribute(weight_input(1, "potter"), "step") == "0.05"
    page.fill(weight_input(1, "potter"), "")
    assert "mos-invalid" in page.get_attribute(weight_input(1, "potter"), "class")
    page.keyboard.press("Tab")
    assert page.input_value(weight_input(1, "potter")) == "-1.5"  # back to the JSON's weight
    assert loras_of(spec_json(page))[1] == [{"name": "potter", "weight": -1.5}]

    # a second LoRA, then remove the first with its ×
    pick(page, 1, "watercolor", "water")
    wait_json(page, "spec.regions[1].loras.length === 2")
    page.click(f"{region(1)} .mos-lora[data-name='potter'] .mos-lora-remove")
    spec = wait_json(page, "spec.regions[1].loras.length === 1")
    assert loras_of(spec) == [[{"name": "potter", "weight": 1}], [{"name": "watercolor", "weight": 1}]]
    assert chips(page, 1) == ["watercolor"]

    # the spec's share of the main prompt in regions, near Feather, explained in plain words
    assert HINT in page.inner_text(".mos-canvas .mos-global-hint")
    assert page.input_value(".mos-canvas .mos-global-weight") == "0"
    page.fill(".mos-canvas .mos-global-weight", "0.3")
    assert wait_json(page, "spec.global_weight === 0.3")["global_weight"] == 0.3
    assert page.get_attribute(f"{region(0)} .mos-region-global", "placeholder") == "0.3"
    # a region's own share; empty = the spec's; out of [0, 1] is not written
    page.fill(f"{region(0)} .mos-region-global", "0.5")
    spec = wait_json(page, "spec.regions[0].global_weight === 0.5")
    assert "global_weight" not in spec["regions"][1]
    page.fill(f"{region(0)} .mos-region-global", "1.5")
    assert "mos-invalid" in page.get_attribute(f"{region(0)} .mos-region-global", "class")
    assert spec_json(page)["regions"][0]["global_weight"] == 0.5
    page.keyboard.press("Tab")  # left out of range: clamped
    wait_json(page, "spec.regions[0].global_weight === 1")
    assert page.input_value(f"{region(0)} .mos-region-global") == "1"
    page.fill(f"{region(0)} .mos-region-global", "")  # empty: the spec's
    assert "global_weight" not in wait_json(page, "spec.regions[0].global_weight === undefined")["regions"][0]
    page.fill(f"{region(0)} .mos-region-global", "0.5")
    wait_json(page, "spec.regions[0].global_weight === 0.5")
    page.fill(f"{region(1)} .mos-region-global", "0")  # 0 overrides the spec's 0.3
    spec = wait_json(page, "spec.regions[1].global_weight === 0")

    parsed = RegionSpec.from_json(page.locator(JSON_BOX).input_value())  # as the script reads it
    assert parsed.regions[0].lora_refs() == (LoraRef("potter", 1.0),)
    assert parsed.regions[1].lora_refs() == (LoraRef("watercolor", 1.0),)
    assert parsed.global_weight == 0.3 and parsed.global_weights() == [0.5, 0.0]

    # undo is for shapes: nudging a box and undoing it keeps the LoRAs and weights
    before = spec_json(page)
    page.click(f"{region(0)} .mos-swatch")
    page.focus(".mos-canvas canvas.mos-surface")
    page.keyboard.press("ArrowRight")
    left = before["regions"][0]["box"][1]
    assert wait_json(page, f"spec.regions[0].box[1] !== {left}")["regions"][0]["box"][1] == left + 8 / 512
    page.keyboard.press("Control+z")
    wait_json(page, f"spec.regions[0].box[1] === {left}")
    assert spec_json(page) == before
    assert chips(page, 0) == ["potter"] and page.input_value(f"{region(0)} .mos-region-global") == "0.5"

    # the spec's weight back to 0: left out, as RegionSpec.to_json does
    page.fill(".mos-canvas .mos-global-weight", "0")
    assert "global_weight" not in wait_json(page, "spec.global_weight === undefined")

    open_picker(page, 1)
    search(page, 1, "chars")
    page.mouse.move(0, 0)
    OUTPUTS.mkdir(exist_ok=True)
    page.locator("#txt2img_script_container").screenshot(path=str(OUTPUTS / "region-canvas-loras.png"))
    served.wait_idle()
    assert browser_page.errors == []


def test_pasted_loras_show_and_round_trip(served, browser_page):
    """JSON typed or pasted with LoRAs and global weights shows them in the list, unknown names
    flagged but kept; an unrelated canvas edit writes them back unchanged."""
    page = browser_page.page
    open_script(page, served)
    typed = {"regions": [
        {"prompt": "a photo of <potter1> <potter2>", "box": [0, 0, 512, 256],
         "loras": [{"name": "potter", "weight": 0.8}, {"name": "ghost"}], "global_weight": 0.25},
        {"prompt": "<lora:hermione:0.6> a witch", "box": [0, 256, 512, 512]},
    ], "feather": 1, "global_weight": 0.2, "passes": True}
    page.fill(JSON_BOX, json.dumps(typed))
    page.wait_for_selector(f"{region(1)} .mos-prompt")
    assert chips(page, 0) == ["potter", "ghost"] and chips(page, 1) == []
    assert page.input_value(weight_input(0, "potter")) == "0.8"
    assert page.input_value(weight_input(0, "ghost")) == "1"  # no weight given: the default
    assert page.input_value(f"{region(0)} .mos-region-global") == "0.25"
    assert page.input_value(f"{region(1)} .mos-region-global") == ""
    assert page.get_attribute(f"{region(1)} .mos-region-global", "placeholder") == "0.2"
    assert page.input_value(".mos-canvas .mos-global-weight") == "0.2"
    # a name the folder lacks is flagged, not dropped (the list is fetched in the background)
    page.wait_for_selector(f"{region(0)} .mos-lora.mos-lora-missing[data-name='ghost']")
    assert "not in the Lora folder" in page.inner_text(f"{region(0)} .mos-lora[data-name='ghost']")
    assert "mos-lora-missing" not in page.get_attribute(f"{region(0)} .mos-lora[data-name='potter']", "class")
    assert page.locator(JSON_BOX).input_value() == json.dumps(typed)  # shown, not rewritten

    # an edit elsewhere writes everything back as it was
    page.fill(f"{region(1)} .mos-negative", "blurry")
    spec = wait_json(page, "spec.regions[1].negative === 'blurry'")
    assert spec == {**typed, "regions": [typed["regions"][0], {**typed["regions"][1], "negative": "blurry"}]}

    # region LoRAs in separate passes: the checkbox shows the pasted field and writes it; the LoRAs'
    # UNet weight in the passes starts at the product's default, can be typed only with passes on
    unet = ".mos-canvas .mos-pass-unet-weight"
    assert page.evaluate("MixOfShow.regions.PASS_UNET_WEIGHT") == PASS_UNET_WEIGHT
    assert page.is_checked(".mos-canvas .mos-passes") and page.is_enabled(unet)
    # gradio's page styles every checkbox `appearance: none` (only its own components draw a tick), so
    # ours must ask for the browser's own, or it shows unticked while on (seen in the real WebUI)
    assert page.evaluate("getComputedStyle(gradioApp().querySelector('.mos-canvas .mos-passes')).appearance") \
        != "none"
    assert float(page.input_value(unet)) == PASS_UNET_WEIGHT
    page.uncheck(".mos-canvas .mos-passes")
    assert not RegionSpec.from_json(json.dumps(wait_json(page, "spec.passes === undefined"))).passes
    assert page.is_disabled(unet)
    page.check(".mos-canvas .mos-passes")
    assert RegionSpec.from_json(json.dumps(wait_json(page, "spec.passes === true"))).passes
    page.fill(unet, "0.5")
    assert RegionSpec.from_json(json.dumps(wait_json(page, "spec.pass_unet_weight === 0.5"))).pass_unet_weight == 0.5
    page.fill(unet, "2")  # out of [0, 1]: flagged, the JSON keeps the last valid number
    assert "mos-invalid" in page.get_attribute(unet, "class")
    page.fill(unet, "")
    page.locator(unet).blur()  # left empty: back to the default, which the JSON leaves out
    assert "pass_unet_weight" not in wait_json(page, "spec.pass_unet_weight === undefined")
    page.fill(JSON_BOX, json.dumps(typed | {"pass_unet_weight": 1}))
    page.wait_for_function(f"gradioApp().querySelector('{unet}').value === '1'")

    # a LoRA given as a tag in the prompt is offered as taken; the listed and the tagged one twice is said
    open_picker(page, 1)
    tagged = page.locator(f"{region(1)} .mos-lora-option[data-name='hermione']")
    assert tagged.get_attribute("aria-disabled") == "true" and "in the prompt" in tagged.inner_text()
    page.keyboard.press("Escape")
    twice = {"regions": [{**typed["regions"][1], "loras": [{"name": "hermione", "weight": 1}]}]}
    page.fill(JSON_BOX, json.dumps(twice))
    page.wait_for_function("gradioApp().querySelectorAll('.mos-region').length === 1")
    assert "hermione is given twice" in page.inner_text(f"{region(0)} .mos-problem")
    assert page.locator(JSON_BOX).input_value() == json.dumps(twice)

    # a broken loras field is said, and nothing is rewritten or dropped
    broken = json.dumps({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "units": "fraction", "loras": "potter"}]})
    page.fill(JSON_BOX, broken)
    page.wait_for_selector(".mos-status.mos-error")
    assert "loras" in page.inner_text(".mos-status")
    assert page.locator(JSON_BOX).input_value() == broken
    served.wait_idle()
    assert browser_page.errors == []


def test_list_is_read_when_opened_and_failures_are_said(served, browser_page):
    """A file added to the Lora folder shows up the next time the list opens; a failing route and an
    empty folder each give a plain message instead of an empty list."""
    page = browser_page.page
    open_script(page, served)
    page.click(".mos-canvas button:has-text('+ Region')")
    page.wait_for_selector(f"{region(0)} .mos-lora-add")
    open_picker(page, 0)
    assert "newcomer" not in listed(page, 0)
    page.keyboard.press("Escape")
    added = write_lora(served.lora_dir / "new" / "newcomer.safetensors")
    try:
        open_picker(page, 0)
        assert "newcomer" in listed(page, 0)
        assert search(page, 0, "new/") == ["newcomer"]
        page.keyboard.press("Escape")
    finally:
        shutil.rmtree(added.parent)

    page.route("**/mix-of-show/loras", lambda route: route.fulfill(status=500, body="Internal Server Error"))
    open_picker(page, 0)
    message = page.locator(f"{region(0)} .mos-lora-message")
    assert "Could not read the LoRA list" in message.inner_text() and "500" in message.inner_text()
    assert "mos-error" in message.get_attribute("class") and listed(page, 0) == []
    page.keyboard.press("Escape")
    page.unroute("**/mix-of-show/loras")
    page.route("**/mix-of-show/loras", lambda route: route.fulfill(status=200, body='{"loras": []}',
                                                                   content_type="application/json"))
    open_picker(page, 0)
    assert "No LoRA files in the Lora folder" in message.inner_text() and listed(page, 0) == []
    page.unroute("**/mix-of-show/loras")
    assert spec_json(page) == {"regions": [{"prompt": ""}], "passes": True}  # nothing picked, nothing written
    served.wait_idle()
    # the browser itself reports the failed request; nothing else may go wrong
    assert [e for e in browser_page.errors if "status of 500" not in e] == []
