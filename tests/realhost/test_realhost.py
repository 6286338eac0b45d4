"""The extension in the real WebUI v1.10.1, driven as a user drives it: the HTTP API, the CLIs run
with the WebUI's own Python from the extension's folder, and the fusion and training tabs in Chromium.

The tests run in file order on one host process and build on each other (files converted first
are used later). The first and the last test generate the same plain image; after everything in
between (LoRAs, bindings, regions, a fused checkpoint loaded and unloaded), it must be
pixel-identical.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from webui_process import HostError, encode_png, images, infotexts, pixels

from lib_mos.concepts import synthetic
from lib_mos.models import sd1
from lib_mos.regional.regions import PASS_UNET_WEIGHT, RegionSpec

PLAIN = dict(prompt="a photo of a house by a lake", seed=7)
# (concept, key spelling, how the file was written): every combination of the authors' files
AUTHORS_FILES = [("potter", "main", "newer"), ("hermione", "research_branch", "torch2.0"),
                 ("ron", "main", "torch2.0"), ("ginny", "research_branch", "newer")]
STATE: dict = {}
# the README's three screenshots of the real WebUI land here (copied into docs/screenshots by hand)
SHOTS = Path(__file__).resolve().parents[2] / "outputs" / "screenshots"


def png_base64(result: dict, index: int = 0) -> str:
    return result["images"][index]


def test_plain_image_before(realhost):
    STATE["plain"] = pixels(realhost.txt2img(**PLAIN))
    assert STATE["plain"].shape == (128, 128, 3)


@pytest.fixture(scope="module")
def authors(realhost):
    """The authors' ED-LoRA files for SD1.5 (random values), in a folder of the data directory."""
    skeleton = sd1.build_sd15_skeleton()
    source = realhost.data / "authors"
    source.mkdir(exist_ok=True)
    for seed, (name, spelling, style) in enumerate(AUTHORS_FILES, start=1):
        concept = synthetic.random_concept(skeleton, (f"<{name}1>", f"<{name}2>"), seed=seed, name=name)
        synthetic.save_torch_file(synthetic.authors_params(concept, spelling), source / f"{name}.pth", style=style)
    return source


def test_authors_files_convert_with_the_webui_python(realhost, authors):
    """Both key spellings, written by torch 2.0 and by newer torch, through `python -m lib_mos
    convert` run as a user runs it: the WebUI's Python, from the extension's folder."""
    source = authors
    for name, spelling, style in AUTHORS_FILES:
        out = realhost.loras / f"{name}.safetensors"
        proc = realhost.run_python("-m", "lib_mos", "convert", str(source / f"{name}.pth"), str(out))
        print(f"convert {name}.pth ({spelling}, {style}): rc={proc.returncode} {proc.stdout.strip()} {proc.stderr.strip()}")
        assert proc.returncode == 0 and out.is_file(), proc.stderr
    realhost.post("/sdapi/v1/refresh-loras")
    names = {item["name"] for item in realhost.get("/sdapi/v1/loras")}
    assert {"potter", "hermione", "ron", "ginny"} <= names


def test_lora_tag_and_concept_tokens_without_the_script(realhost):
    result = realhost.txt2img("<lora:potter:1> a photo of <potter1> <potter2>", negative_prompt="blurry <ron2>", seed=3)
    info = infotexts(result)[0]
    print("infotext:", info)
    assert "Mix-of-Show concepts: " in info and "potter.safetensors@" in info and "ron.safetensors@" in info
    assert "Lora hashes" in info
    assert "Script:" not in info


def test_unknown_tokens(realhost):
    result = realhost.txt2img("a photo of <nobody> on a beach", seed=2)  # no script: text, with a warning
    assert result["images"]
    assert "<nobody>" in realhost.log_text() and "left in the prompt as text" in realhost.log_text()
    with pytest.raises(HostError) as exc:
        realhost.txt2img("a photo of <nobody>", script_name="mix-of-show", script_args=[""])
    print("with the script:", exc.value.body[:400])
    assert exc.value.status == 500 and "available: " in exc.value.body and "<potter1>" in exc.value.body


REGIONS = {"regions": [
    {"prompt": "<potter1> <potter2> waving", "negative": "blurry", "box": [0, 0, 1, 0.5], "units": "fraction"},
    {"prompt": "<hermione1> <hermione2> reading", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
REGIONAL = dict(prompt="two friends in a park <lora:potter:1> <lora:hermione:1>", negative_prompt="dark", seed=11,
                batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=1,
                denoising_strength=0.5, override_settings={"s_min_uncond": 20.0})


def test_regions_with_batching_hires_and_ngms_then_png_info_round_trip(realhost):
    try:
        result = realhost.txt2img(script_name="mix-of-show", script_args=[json.dumps(REGIONS)], **REGIONAL)
        info = infotexts(result)[0]
        print("infotext:", info)
        assert len(infotexts(result)) == 2 and images(result)[0].size == (192, 192)
        parsed = realhost.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + png_base64(result)})["parameters"]
        assert parsed["Script"] == "Mix-of-Show"
        assert RegionSpec.from_json(parsed["Mix-of-Show regions"]).to_json() == RegionSpec.from_json(
            json.dumps(REGIONS)).to_json()
        assert "potter.safetensors@" in parsed["Mix-of-Show concepts"]
        again = realhost.txt2img(script_name="mix-of-show", script_args=[parsed["Mix-of-Show regions"]], **REGIONAL)
        assert np.array_equal(pixels(again), pixels(result))
    finally:
        realhost.post("/sdapi/v1/options", {"s_min_uncond": 0.0})


def test_img2img_binds_concept_tokens(realhost):
    init = "data:image/png;base64," + encode_png(STATE["plain"])
    result = realhost.post("/sdapi/v1/img2img", dict(init_images=[init], prompt="<ginny1> <ginny2> in the rain", steps=2,
                                                     width=128, height=128, seed=5, denoising_strength=0.6,
                                                     sampler_name="Euler"))
    info = infotexts(result)[0]
    print("img2img infotext:", info)
    assert "ginny.safetensors@" in info


def test_fuse_authors_files_with_the_cli_and_load_the_result(realhost, authors):
    source = authors
    base = realhost.checkpoints / "sd15-random.safetensors"
    out = realhost.checkpoints / "fused-cli.safetensors"
    args = ["-m", "lib_mos", "fuse", "--base", str(base), "--out", str(out), "--spatial-steps", "1",
            "--spatial-size", "128"]
    for name, _, _ in AUTHORS_FILES:
        args += ["--concept", str(source / f"{name}.pth")]
    proc = realhost.run_python(*args)
    print("fuse:", proc.stdout[-1500:], proc.stderr[-1500:])
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    realhost.post("/sdapi/v1/refresh-checkpoints")
    result = realhost.txt2img("a photo of <potter1> <potter2> and <ginny1> <ginny2>", seed=4,
                              override_settings={"sd_model_checkpoint": "fused-cli"})
    info = infotexts(result)[0]
    print("fused infotext:", info)
    assert "from the checkpoint" in info and "fused-cli" in info


@pytest.fixture(scope="module")
def everyday(realhost):
    """LoRAs as users download them, for SD1.5 (random values): a kohya LoCon with `ss_tag_frequency`
    and the host's sidecar json, a LyCORIS LoHa, both on a sample of every layer type; and smaller
    ones (attention, text encoder, the first resnets' convs and the first downsampler) for a fusion
    this CPU can run next to the WebUI."""
    import lora_layouts as layouts

    skeleton = sd1.build_sd15_skeleton()
    hero = layouts.kohya_locon(skeleton, few=True).save(realhost.loras, "hero")
    layouts.write_sidecar(hero, "ohwx man")
    layouts.loha(skeleton, few=True).save(realhost.loras, "bird")
    small = realhost.data / "small"
    small.mkdir(exist_ok=True)
    cheap = (layouts.attention_layers(skeleton) + layouts.text_layers(skeleton)
             + [layer for layer in layouts.resnet_layers(skeleton) + layouts.sampler_layers(skeleton)
                if layer[1].startswith(("input_blocks.1.", "input_blocks.2.", "input_blocks.3."))])
    for name, seed, make in (("hero-small", 5, layouts.lora_parts), ("bird-small", 6, layouts.loha_parts)):
        gen = torch.Generator().manual_seed(seed)
        layouts._build(skeleton, cheap, lambda i, layer, m, _make=make, _gen=gen: _make(m.weight.shape, 4, _gen),
                       spelling="diffusers", dtype=torch.float16 if make is layouts.lora_parts else torch.float32,
                       metadata=layouts.kohya_metadata(), few=False).save(small, name)
    realhost.post("/sdapi/v1/refresh-loras")
    return small


def test_everyday_loras_apply_convert_and_fuse(realhost, authors, everyday):
    """A kohya LoCon and a LyCORIS LoHa apply in the real host without errors; converted to our
    format (trigger words from the sidecar json, and given) they give pixel-identical images; a mixed
    set (an authors' ED-LoRA, the LoCon by its activation text, the LoHa by given trigger words)
    fuses with the CLI and the report compares fused, averaged and stacked."""
    prompts = {"hero": "a photo of ohwx man", "bird": "a photo of zkq bird"}
    before = {}
    for name, prompt in prompts.items():
        result = realhost.txt2img(f"<lora:{name}:1> {prompt}", seed=5)
        info = infotexts(result)[0]
        print(f"{name} infotext:", info)
        assert "Networks with errors" not in info and "Lora hashes" in info
        before[name] = pixels(result)
    assert not np.array_equal(before["hero"], pixels(realhost.txt2img(prompts["hero"], seed=5)))
    convert = {"hero": [], "bird": ["--trigger", "zkq bird"]}
    for name, extra in convert.items():
        proc = realhost.run_python("-m", "lib_mos", "convert", str(realhost.loras / f"{name}.safetensors"),
                                   str(realhost.loras / f"{name}-mos.safetensors"), *extra)
        print(f"convert {name}: rc={proc.returncode} {proc.stdout.strip()} {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
    assert "activation text of hero.json" in realhost.run_python(
        "-m", "lib_mos", "convert", str(realhost.loras / "hero.safetensors"), str(realhost.data / "x.safetensors")).stdout
    realhost.post("/sdapi/v1/refresh-loras")
    for name, prompt in prompts.items():
        after = pixels(realhost.txt2img(f"<lora:{name}-mos:1> {prompt}", seed=5))
        print(f"{name}: original vs converted, max pixel difference {np.abs(after.astype(int) - before[name]).max()}")
        assert np.array_equal(after, before[name])

    out = realhost.checkpoints / "fused-everyday.safetensors"
    proc = realhost.run_python(
        "-m", "lib_mos", "fuse", "--base", str(realhost.checkpoints / "sd15-random.safetensors"), "--out", str(out),
        "--spatial-steps", "1", "--spatial-size", "128", "--concept", str(authors / "potter.pth"),
        "--concept", str(everyday / "hero-small.safetensors"), "--concept", f"{everyday / 'bird-small.safetensors'}#zkq bird")
    print("fuse:", proc.stdout[-3000:], proc.stderr[-1500:])
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    assert "stacked" in proc.stdout and "trigger words \"zkq bird\" as given" in proc.stdout
    realhost.post("/sdapi/v1/refresh-checkpoints")
    result = realhost.txt2img("a photo of <potter1> <potter2> and ohwx man", seed=4,
                              override_settings={"sd_model_checkpoint": "fused-everyday"})
    assert "fused-everyday" in infotexts(result)[0]


def test_fusion_tab_lists_a_kohya_lora_with_its_trigger_words(realhost, everyday):
    from browser import Browser, pick_option

    with Browser() as browser:
        page = browser.page
        page.goto(realhost.url, timeout=120_000)
        page.click("#tabs > .tab-nav > button:has-text('Mix-of-Show fusion')", timeout=120_000)
        page.click("#mos_fusion_refresh")
        pick_option(page, "mos_fusion_files", "hero.safetensors")
        # the table starts with one empty row: wait for the file's own
        page.wait_for_function("() => gradioApp().querySelector('#mos_fusion_table tbody').textContent"
                               ".includes('hero.safetensors')", timeout=60_000)
        table = page.evaluate("() => gradioApp().querySelector('#mos_fusion_table tbody').textContent")
        print("tab table:", table)
        assert "ohwx man" in table and "hero.json" in table
        assert not browser.errors, browser.errors


def test_region_loras_through_the_api_and_the_canvas(realhost, everyday):
    """Each region its own LoRA in the real WebUI: the Lora folder route the canvas reads; a region
    over the whole image with the LoCon samples as the host's own <lora:hero:1>; weight 0 is no
    LoRA; two regions with two LoRAs (the LoHa changes the time embedding too) against the same
    regions without them, timed; a missing name is an HTTP 500 naming it; the canvas' picker puts a
    LoRA into its region's JSON."""
    from browser import Browser, choose_script

    listing = realhost.get("/mix-of-show/loras")
    print("route:", [(e["name"], e["path"]) for e in listing["loras"]])
    assert {"hero", "bird"} <= {e["name"] for e in listing["loras"]}

    def whole(**region) -> list[str]:
        return [json.dumps({"regions": [{"prompt": "a photo of ohwx man", "negative": "dark", "box": [0, 0, 1, 1],
                                         "units": "fraction", **region}]})]

    common = dict(negative_prompt="dark", seed=5, script_name="mix-of-show")
    ours = realhost.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero", "weight": 1}]), **common)
    hosts = realhost.txt2img("<lora:hero:1> a photo of ohwx man", script_args=whole(), **common)
    plain = realhost.txt2img("a photo of ohwx man", script_args=whole(), **common)
    info = infotexts(ours)[0]
    print("region LoRA infotext:", info)
    assert 'Mix-of-Show region LoRAs: "region 0: hero 1"' in info  # the host quotes values with ':'
    diff = np.abs(pixels(ours).astype(int) - pixels(hosts)).max()
    print(f"whole-image region LoRA vs the host's <lora:hero:1>: max pixel difference {diff}; vs no LoRA "
          f"{np.abs(pixels(plain).astype(int) - pixels(hosts)).max()}")
    assert diff <= 2 and not np.array_equal(pixels(plain), pixels(hosts))
    zero = realhost.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero", "weight": 0}]), **common)
    assert np.array_equal(pixels(zero), pixels(plain))

    two = {"regions": [{"prompt": "a photo of ohwx man", "box": [0, 0, 1, 0.5], "units": "fraction"},
                       {"prompt": "a photo of zkq bird", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
    with_loras = json.loads(json.dumps(two))
    with_loras["regions"][0]["loras"] = [{"name": "hero"}]
    with_loras["regions"][1]["prompt"] += " <lora:bird:0.8>"
    times = {}
    for label, spec in (("without", two), ("with", with_loras), ("without again", two), ("with again", with_loras)):
        start = time.perf_counter()
        result = realhost.txt2img("two friends", script_args=[json.dumps(spec)], **(common | {"seed": 6}))
        times[label] = time.perf_counter() - start
        assert result["images"]
    print("two regions, request seconds:", {k: round(v, 2) for k, v in times.items()})

    with pytest.raises(HostError) as exc:
        realhost.txt2img("a cat", script_args=whole(loras=[{"name": "heroo"}]), **common)
    print("missing LoRA:", exc.value.body[:300])
    assert exc.value.status == 500 and "no LoRA named 'heroo'" in exc.value.body and "did you mean hero" in exc.value.body

    with Browser() as browser:
        page = browser.page
        page.goto(realhost.url, timeout=120_000)
        choose_script(page, "Mix-of-Show")
        page.click(".mos-canvas button:has-text('+ Region')", timeout=60_000)
        page.click(".mos-region[data-index='0'] .mos-lora-add")
        page.wait_for_selector(".mos-region[data-index='0'] .mos-lora-option[data-name='hero']", timeout=60_000)
        page.fill(".mos-region[data-index='0'] .mos-lora-search", "bir")
        page.click(".mos-region[data-index='0'] .mos-lora-option[data-name='bird']")
        page.wait_for_function("() => gradioApp().querySelector('#script_mixofshow_regions textarea').value"
                               ".includes('bird')", timeout=30_000)
        spec = json.loads(page.evaluate("() => gradioApp().querySelector('#script_mixofshow_regions textarea').value"))
        print("canvas JSON:", spec)
        assert spec["regions"][0]["loras"] == [{"name": "bird", "weight": 1}]
        assert not browser.errors, browser.errors


def test_two_regions_with_their_loras_drawn_in_the_canvas_and_generated(realhost, everyday):
    """The README's first workflow in the browser: the script chosen, the fresh canvas offering
    region LoRAs in separate passes at the default UNet weight, two regions each with a LoRA (typed
    as JSON as the canvas writes it, which redraws the canvas), their prompts in boxes wide enough
    to read and numbers readable on their colours, generated with the Generate button; the
    screenshot is the README's."""
    from browser import Browser, choose_script, contrast, css_rgb, swatch_colors

    spec = {"regions": [
        {"prompt": "a photo of ohwx man, red coat", "box": [0.1, 0.05, 0.95, 0.5], "units": "fraction",
         "loras": [{"name": "hero", "weight": 0.8}]},
        {"prompt": "a photo of zkq bird on a branch", "box": [0.2, 0.55, 0.9, 0.95], "units": "fraction",
         "loras": [{"name": "bird", "weight": 1}]}], "feather": 0, "global_weight": 0, "passes": True}
    with Browser(viewport=(1400, 1100)) as browser:
        page = browser.page
        page.goto(realhost.url, timeout=120_000)
        page.fill("#txt2img_prompt textarea", "two friends in a park, sunny day")
        for elem, value in (("txt2img_steps", "6"), ("txt2img_width", "384"), ("txt2img_height", "256")):
            page.fill(f"#{elem} input[type=number]", value)
            page.press(f"#{elem} input[type=number]", "Enter")
        choose_script(page, "Mix-of-Show")
        page.wait_for_selector(".mos-canvas .mos-passes", timeout=60_000)
        unet = page.input_value(".mos-canvas .mos-pass-unet-weight")
        print(f"fresh canvas: separate passes {page.is_checked('.mos-canvas .mos-passes')}, UNet weight {unet}")
        assert page.is_checked(".mos-canvas .mos-passes") and float(unet) == PASS_UNET_WEIGHT
        page.fill("#script_mixofshow_regions textarea", json.dumps(spec))
        page.wait_for_selector(".mos-region[data-index='1']", timeout=60_000)
        passes = "#tab_txt2img .mos-canvas .mos-passes"
        print("after the JSON: separate passes", page.is_checked(passes), "UNet weight enabled",
              page.is_enabled("#tab_txt2img .mos-canvas .mos-pass-unet-weight"))
        assert page.is_checked(passes) and page.is_enabled("#tab_txt2img .mos-canvas .mos-pass-unet-weight")
        width = page.locator(".mos-region[data-index='0'] .mos-prompt").bounding_box()["width"]
        colours = swatch_colors(page)
        ratios = [round(contrast(css_rgb(fg), css_rgb(bg)), 2) for fg, bg in colours]
        print(f"region prompt box {width:.0f} px wide; number contrast {ratios}")
        assert width >= 300 and all(r >= 4.5 for r in ratios)
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=600_000)
        page.wait_for_function("() => !gradioApp().querySelector('#txt2img_interrupt') || "
                               "getComputedStyle(gradioApp().querySelector('#txt2img_interrupt')).display === 'none'",
                               timeout=600_000)
        info = page.inner_text("#html_info_txt2img")
        print("infotext on the page:", info[:400])
        assert "Mix-of-Show region LoRAs" in info and re.search(r'\\?"passes\\?":\s*true', info)
        assert page.is_checked(passes)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.locator("#tab_txt2img").screenshot(path=str(SHOTS / "regions.png"))
        # the host's page raises this itself when its Width/Height number boxes are typed into and
        # during the generation that follows, with no extension installed (checked against v1.10.1)
        own = [e for e in browser.errors if e != "pageerror: Cannot read properties of undefined (reading 'props')"]
        assert not own, browser.errors


def test_the_global_prompts_share_in_a_lora_region_is_read_through_its_lora(realhost, everyday):
    """A region over the whole image with the main prompt, a UNet-only LoCon and half of the global
    prompt kept: both halves read the same prompt through the same LoRA, so the picture is the
    WebUI's own `<lora:hero-unet:1>`."""
    import lora_layouts as layouts

    hero = layouts.kohya_locon(sd1.build_sd15_skeleton(), few=True)
    layouts.LoraFile({k: v for k, v in hero.tensors.items() if k.startswith("lora_unet_")},
                     hero.metadata).save(realhost.loras, "hero-unet")
    realhost.post("/sdapi/v1/refresh-loras")
    spec = {"regions": [{"prompt": "a photo of ohwx man", "negative": "dark", "box": [0, 0, 1, 1], "units": "fraction",
                         "loras": [{"name": "hero-unet"}]}], "global_weight": 0.5}
    common = dict(negative_prompt="dark", seed=5, script_name="mix-of-show")
    ours = realhost.txt2img("a photo of ohwx man", script_args=[json.dumps(spec)], **common)
    hosts = realhost.txt2img("<lora:hero-unet:1> a photo of ohwx man", script_args=[""], **common)
    plain = realhost.txt2img("a photo of ohwx man", script_args=[""], **common)
    diff = np.abs(pixels(ours).astype(int) - pixels(hosts)).max()
    print(f"global weight 0.5 in a whole-image LoRA region vs the WebUI's <lora:hero-unet:1>: max pixel difference "
          f"{diff}; vs no LoRA {np.abs(pixels(plain).astype(int) - pixels(hosts)).max()}")
    assert diff <= 2 and not np.array_equal(pixels(plain), pixels(hosts))


def test_a_region_loras_spill_with_one_pass_and_with_region_passes(realhost, everyday):
    """How much a LoRA in the left region changes the right third of the picture against the left
    third (the issue's measure: 192x128, 2 steps), sampled in one pass and with `passes` (the UNet
    at the LoRA's full weight, and at the default share); with a pass per region the right half's
    prediction never sees the left LoRA: it must spill clearly less (the rest is the shared latent
    at the second step and the VAE's reach across the edge)."""
    def spec(loras: list, passes: bool, unet: float | None) -> list[str]:
        return [json.dumps({"regions": [
            {"prompt": "a photo of ohwx man", "box": [0, 0, 1, 0.5], "units": "fraction", "loras": loras},
            {"prompt": "a photo of a red bird", "box": [0, 0.5, 1, 1], "units": "fraction"}], "passes": passes}
            | ({} if unet is None else {"pass_unet_weight": unet}))]

    common = dict(negative_prompt="dark", seed=9, steps=2, width=192, height=128, script_name="mix-of-show")
    spill, change_at = {}, {}
    for passes, unet in ((False, None), (True, 1), (True, None)):  # one pass; passes at full UNet weight; default
        start = time.perf_counter()
        without = pixels(realhost.txt2img("two friends", script_args=spec([], passes, unet), **common)).astype(float)
        result = realhost.txt2img("two friends", script_args=spec([{"name": "hero"}], passes, unet), **common)
        seconds = time.perf_counter() - start
        change = np.abs(pixels(result).astype(float) - without).mean(axis=(0, 2))  # per pixel column
        left, right = change[:64].mean(), change[128:].mean()
        spill[passes, unet] = right / left
        change_at[passes, unet] = left, right
        print(f"passes={passes} pass_unet_weight={unet or 'default'}: the left region's LoRA changes the left third "
              f"by {left:.2f}, the right third by {right:.2f} ({right / left:.0%}); both requests {seconds:.1f} s")
        if passes:  # the spec is saved, quoted by the host: {\"regions\": ..., \"passes\":true}
            assert re.search(r'\\?"passes\\?":true', infotexts(result)[0])
    assert spill[True, 1] < 0.75 * spill[False, None]
    # the default UNet share does less on its own side too (the ratio lands between), and reaches the
    # other side far less than one pass does
    assert change_at[True, None][0] < 0.8 * change_at[True, 1][0]
    assert change_at[True, None][1] < 0.75 * change_at[False, None][1] and spill[True, None] < spill[False, None]


def test_fusion_tab_in_the_browser_reads_authors_files(realhost, authors):
    """The tab lists the authors' .pth files in models/Lora (read under the host's pickle guard) and
    fuses them into the checkpoint folder."""
    from browser import Browser, pick_option

    for name in ("potter", "hermione"):  # one of each key spelling, torch 2.0 and newer torch
        (realhost.loras / f"{name}-authors.pth").write_bytes((authors / f"{name}.pth").read_bytes())
    with Browser() as browser:
        page = browser.page
        page.goto(realhost.url, timeout=120_000)
        page.click("#tabs > .tab-nav > button:has-text('Mix-of-Show fusion')", timeout=120_000)
        headers = page.evaluate("() => Array.from(gradioApp().querySelectorAll('#mos_fusion_table thead th'), "
                                "h => h.textContent.trim())")
        print("fusion table headers on a fresh page:", headers)
        assert headers and headers[0] != "0" and "file" in " ".join(headers).lower(), headers
        page.click("#mos_fusion_refresh")  # the files appeared after the page was built
        for name in ("potter-authors.pth", "hermione-authors.pth"):
            pick_option(page, "mos_fusion_files", name)
        page.wait_for_function("() => gradioApp().querySelectorAll('#mos_fusion_table tbody tr').length >= 2")
        table = page.evaluate("() => gradioApp().querySelector('#mos_fusion_table tbody').textContent")
        print("tab table:", table)
        assert "<hermione1>+<hermione2>" in table and "unreadable" not in table
        for elem, value in (("mos_fusion_spatial_steps", "1"), ("mos_fusion_spatial_size", "256")):
            page.fill(f"#{elem} input[type=number]", value)
            page.press(f"#{elem} input[type=number]", "Enter")
        page.fill("#mos_fusion_name textarea, #mos_fusion_name input", "fused-tab.safetensors")
        # the base defaults to the checkpoint loaded now (after the CLI test, its fused one)
        loaded = realhost.get("/sdapi/v1/options")["sd_model_checkpoint"]
        print("loaded checkpoint:", loaded, "| tab's base:", page.input_value("#mos_fusion_base input"))
        assert page.input_value("#mos_fusion_base input") == loaded
        if not loaded.startswith("sd15-random.safetensors"):
            pick_option(page, "mos_fusion_base", next(t["title"] for t in realhost.get("/sdapi/v1/sd-models")
                                                      if t["model_name"] == "sd15-random"))
        assert page.input_value("#mos_fusion_base input").startswith("sd15-random.safetensors")
        rss_before = realhost.rss_bytes()
        page.click("#mos_fusion_run")
        page.wait_for_selector(".progressDiv", timeout=120_000)  # the host's own progress bar
        page.wait_for_function("() => /Saved|rror/.test(gradioApp().querySelector('#mos_fusion_status').textContent)",
                               timeout=1_500_000)
        status = page.inner_text("#mos_fusion_status")
        rss_after = realhost.rss_bytes()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.locator("#tab_mos_fusion").screenshot(path=str(SHOTS / "fusion.png"))
        print(f"tab status: {status}\nWebUI RSS before the tab fusion {rss_before / 2**30:.2f} GiB, "
              f"after {rss_after / 2**30:.2f} GiB")
        assert "Saved" in status
        assert rss_after <= 1.10 * rss_before, "the WebUI kept the fusion's memory"
        # the top checkpoint dropdown lists the new file without a manual refresh
        pick_option(page, "setting_sd_model_checkpoint", next(
            t for t in realhost.get("/sdapi/v1/sd-models") if t["model_name"] == "fused-tab")["title"], timeout=30,
            choose=False)
        assert not browser.errors, browser.errors
    assert (realhost.checkpoints / "fused-tab.safetensors").is_file()


def test_training_tab_in_the_browser(realhost, tmp_path):
    """A user trains a concept in the tab on the loaded SD1.5 (two 64 px pictures, two steps): the
    host's progress bar shows, the concept lands in models/Lora and the Lora list at once, and the
    model is left as it was (the last test's image is pixel-identical to the first's)."""
    from browser import Browser
    from PIL import Image, ImageDraw

    base = next(t["title"] for t in realhost.get("/sdapi/v1/sd-models") if t["model_name"] == "sd15-random")
    if realhost.get("/sdapi/v1/options")["sd_model_checkpoint"] != base:
        realhost.post("/sdapi/v1/options", {"sd_model_checkpoint": base})
    folder = tmp_path / "discs"
    folder.mkdir()
    for k in range(2):
        img = Image.new("RGB", (64, 64), (30 + 90 * k, 60, 200))
        ImageDraw.Draw(img).ellipse((10 + 6 * k, 12, 46 + 6 * k, 50), fill=(220, 30, 30))
        img.save(folder / f"disc{k}.png")
        (folder / f"disc{k}.txt").write_text("a red ball")
    with Browser() as browser:
        page = browser.page
        page.goto(realhost.url, timeout=120_000)
        page.click("#tabs > .tab-nav > button:has-text('Mix-of-Show training')", timeout=120_000)
        # before Train: only the Kind's fields, no gallery, Interrupt disabled, an estimate
        page.wait_for_selector("#mos_train_tokens", state="visible", timeout=60_000)
        assert page.is_hidden("#mos_train_trigger") and page.is_hidden("#mos_train_gallery")
        assert page.is_disabled("#mos_train_interrupt")
        assert "Estimated time" in page.inner_text("#mos_train_estimate")
        for elem, value in (("mos_train_folder", str(folder)), ("mos_train_name", "disc-tab"),
                            ("mos_train_class_word", "ball")):
            page.fill(f"#{elem} textarea, #{elem} input", value)
        page.fill("#mos_train_tokens textarea, #mos_train_tokens input", "<disctab1>+<disctab2>")
        page.click("#mos_train_kind label:has-text('LoRA (trigger words)')")  # the other Kind's fields
        page.wait_for_selector("#mos_train_trigger", state="visible", timeout=30_000)
        assert page.is_hidden("#mos_train_tokens")
        page.click("#mos_train_kind label:has-text('ED-LoRA')")
        page.wait_for_selector("#mos_train_tokens", state="visible", timeout=30_000)
        print("training tab before Train:", page.inner_text("#mos_train_estimate"), "| templates:",
              page.input_value("#mos_train_templates input"), "| regulariser:",
              page.input_value("#mos_train_attn_reg input[type=number]"))
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.locator("#tab_mos_train").screenshot(path=str(SHOTS / "training.png"))
        for elem, value in (("mos_train_steps", "2"), ("mos_train_batch_size", "1"), ("mos_train_resolution", "64")):
            page.fill(f"#{elem} input[type=number]", value)
            page.press(f"#{elem} input[type=number]", "Enter")
        page.click("#mos_train_run")
        try:  # the host's own progress bar, with the trainer's step and loss
            page.wait_for_function("() => /Mix-of-Show training/.test(Array.from(gradioApp().querySelectorAll("
                                   "'.progressDiv')).map(d => d.textContent).join(' '))", timeout=300_000)
            page.wait_for_function("() => /Saved|rror|Interrupted/.test("
                                   "gradioApp().querySelector('#mos_train_status').textContent)", timeout=1_200_000)
        finally:
            page.screenshot(path=str(tmp_path / "training-tab.png"))
            print("screenshot:", tmp_path / "training-tab.png", "| console errors:", browser.errors)
            print("status now:", page.inner_text("#mos_train_status"))
        status = page.inner_text("#mos_train_status")
        print(f"training tab status: {status}")
        assert "Saved" in status and "disc-tab.safetensors" in status
        page.wait_for_function("gradioApp().querySelector('#mos_train_interrupt').disabled", timeout=30_000)
        assert not browser.errors, browser.errors
    assert (realhost.loras / "disc-tab.safetensors").is_file()
    assert "disc-tab" in [lora["name"] for lora in realhost.get("/sdapi/v1/loras")]
    result = realhost.txt2img(prompt="a photo of <disctab1> <disctab2>", seed=3)  # bound at once
    assert len(images(result)) == 1


def test_plain_image_after_everything_is_identical(realhost):
    after = pixels(realhost.txt2img(**PLAIN))
    assert np.array_equal(after, STATE["plain"]), f"max difference {np.abs(after.astype(int) - STATE['plain']).max()}"
