"""The extension in a real Forge (lllyasviel's, f2), driven as a user drives it: the HTTP API and the
page in Chromium (`MOS_FORGE=<forge> make test-realforge`; docs/testing.md says how that Forge is
built offline). Concept tokens bind in every generation, the Mix-of-Show script places regions with
their own LoRAs, fusion runs with Forge's Python, the fusion and training tabs say they do not run
in Forge yet, and the plain image is pixel-identical before and after all of it.

The tests run in file order on one Forge process and build on each other (files written first are
used later).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from webui_process import HostError, encode_png, images, infotexts, pixels

from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import Concept
from lib_mos.concepts.files import write_concept
from lib_mos.models import sd1

TAB_MESSAGE = "{} tab does not run in Forge yet"
PLAIN = dict(prompt="a photo of a house by a lake", seed=7)
STATE: dict = {}


def test_install_is_clean(realforge):
    """install.py, run as Forge runs it (its Python, the Forge folder on PYTHONPATH): everything the
    extension needs ships with Forge except `ldm` for fusion, which goes into the extension's own
    `.mos-ldm` (from PyPI), not Forge's venv; a second run installs nothing."""
    env = {**os.environ, "PYTHONPATH": str(realforge.webui)}
    env.pop("VIRTUAL_ENV", None)
    private = realforge.extension / ".mos-ldm"
    for run in ("first", "second"):
        done = subprocess.run([str(realforge.python), "install.py"], cwd=realforge.extension, env=env,
                              capture_output=True, text=True, timeout=600)
        print(f"install.py ({run} run):", done.returncode, done.stdout[-500:], done.stderr[-500:])
        assert done.returncode == 0 and (private / "ldm" / "modules").is_dir()
    assert "Installing" not in done.stdout + done.stderr
    probe = subprocess.run([str(realforge.python), "-c", "import importlib.util; print(importlib.util.find_spec('ldm'))"],
                           cwd=realforge.webui, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "None"  # Forge's own Python still has no ldm: other extensions see Forge


def write_user_files(host) -> None:
    """What a user puts in the host's folders (random values): a kohya LoCon with trigger words and a
    LyCORIS LoHa (both on a sample of every layer type), an ED-LoRA concept file, and a concept whose
    embedding rows are equal at every layer beside a textual-inversion embedding of the same two
    vectors (which Forge loads with the model, so it is written before the first generation)."""
    import lora_layouts as layouts

    skeleton = sd1.build_sd15_skeleton()
    hero = layouts.kohya_locon(skeleton, few=True).save(host.loras, "hero")
    layouts.write_sidecar(hero, "ohwx man")
    layouts.loha(skeleton, few=True).save(host.loras, "bird")
    write_concept(synthetic.random_concept(skeleton, ("<cat1>", "<cat2>"), seed=4, name="cat"),
                  host.loras / "cat.safetensors", overwrite=True)
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(8)) * 0.3
    twin = Concept(name="twin", tokens=("<twin1>", "<twin2>"),
                   embeddings=vectors.unsqueeze(1).expand(-1, 16, -1).contiguous())
    write_concept(twin, host.loras / "twin.safetensors", overwrite=True)
    host.embeddings.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": vectors.clone()}, str(host.embeddings / "twincat.safetensors"))


@pytest.fixture(scope="module")
def files(realforge):
    write_user_files(realforge)
    return realforge.loras


def test_plain_image_before(realforge, files):
    start = time.perf_counter()
    STATE["plain"] = pixels(realforge.txt2img(**PLAIN))
    print(f"Forge SD1.5 plain 128x128, 2 steps: {time.perf_counter() - start:.1f} s (model load included); "
          f"RSS {realforge.rss_bytes() / 2**30:.1f} GiB")
    assert STATE["plain"].shape == (128, 128, 3)


def test_the_console_has_no_traceback_of_the_extension(realforge):
    log = realforge.log_text()
    assert "does not run in Forge" not in log
    chunks = log.split("Traceback (most recent call last)")[1:]
    ours = [c[:1500] for c in chunks if "mix-of-show" in c.lower() or "mos_" in c]
    assert not ours, ours


def test_concept_tokens_bind_and_equal_rows_give_the_embeddings_picture(realforge):
    """Concept tokens bind in every generation through Forge's own prompt encoder: the infotext
    names the file; a concept whose rows are equal at every layer is textual inversion, so it must
    draw the picture of Forge's own embedding of those vectors."""
    res = realforge.txt2img("a photo of <cat1> <cat2>", seed=3)
    info = infotexts(res)[0]
    print("infotext:", info)
    assert "Mix-of-Show concepts: <cat1> <cat2> from cat.safetensors@" in info
    assert not np.array_equal(pixels(res), pixels(realforge.txt2img("a photo of", seed=3)))
    ours = pixels(realforge.txt2img("a photo of <twin1> <twin2>", seed=3))
    theirs = realforge.txt2img("a photo of twincat", seed=3)
    print("Forge's embedding infotext:", infotexts(theirs)[0])
    difference = np.abs(ours - pixels(theirs)).max()
    print(f"equal-row concept vs Forge's textual inversion: max pixel difference {difference}")
    assert "twincat" in infotexts(theirs)[0] and difference <= 2
    # binding's internal alias embeddings never reach an infotext or the console
    assert "mosbind" not in info + infotexts(theirs)[0] and "mosbind" not in realforge.log_text()


def whole(**region) -> list[str]:
    return [json.dumps({"regions": [{"prompt": "a photo of ohwx man", "negative": "dark", "box": [0, 0, 1, 1],
                                     "units": "fraction", **region}]})]


COMMON = dict(negative_prompt="dark", seed=5, script_name="mix-of-show")


def test_a_whole_image_region_lora_matches_forges_own_lora(realforge):
    listing = realforge.get("/mix-of-show/loras")
    print("route:", [(e["name"], e["path"]) for e in listing["loras"]], listing["family"])
    assert {"hero", "bird", "cat"} <= {e["name"] for e in listing["loras"]} and listing["family"] == "sd1"
    ours = realforge.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero", "weight": 1}]), **COMMON)
    forge = realforge.txt2img("<lora:hero:1> a photo of ohwx man", script_args=whole(), **COMMON)
    plain = realforge.txt2img("a photo of ohwx man", script_args=whole(), **COMMON)
    info = infotexts(ours)[0]
    print("region LoRA infotext:", info)
    assert 'Mix-of-Show region LoRAs: "region 0: hero 1"' in info
    diff = np.abs(pixels(ours) - pixels(forge)).max()
    print(f"whole-image region LoRA vs Forge's <lora:hero:1>: max pixel difference {diff}; "
          f"Forge's LoRA vs none: {np.abs(pixels(plain) - pixels(forge)).max()}")
    assert diff <= 2 and not np.array_equal(pixels(plain), pixels(forge))
    zero = realforge.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero", "weight": 0}]), **COMMON)
    assert np.array_equal(pixels(zero), pixels(plain))


def test_forges_own_lora_alongside_a_region_lora_and_never_twice(realforge):
    """Forge's Lora merges <lora:hero:1> into the weights for the whole image while the region adds
    the LoHa by hooks: the same picture as both LoRAs in the region; the same LoRA in both places
    is refused, naming it."""
    alongside = realforge.txt2img("<lora:hero:1> a photo of ohwx man", script_args=whole(loras=[{"name": "bird"}]),
                                  **COMMON)
    both = realforge.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero"}, {"name": "bird"}]),
                             **COMMON)
    only_bird = realforge.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "bird"}]), **COMMON)
    diff = np.abs(pixels(alongside) - pixels(both)).max()
    print(f"Forge's <lora:hero:1> with the LoHa in the region vs both in the region: max pixel difference {diff}; "
          f"vs the LoHa alone {np.abs(pixels(alongside) - pixels(only_bird)).max()}")
    assert diff <= 2 and not np.array_equal(pixels(alongside), pixels(only_bird))
    with pytest.raises(HostError) as twice:
        realforge.txt2img("<lora:hero:1> a photo of ohwx man", script_args=whole(loras=[{"name": "hero"}]), **COMMON)
    print("the same LoRA twice:", twice.value.body[:300])
    assert "already applied to the whole image" in twice.value.body


def _sides(passes: bool, left: list, right: list) -> list[str]:
    return [json.dumps({"regions": [
        {"prompt": "a photo of ohwx man", "box": [0, 0, 1, 0.5], "units": "fraction", "loras": left},
        {"prompt": "a photo of a bird", "box": [0, 0.5, 1, 1], "units": "fraction", "loras": right}],
        "passes": passes})]


def test_two_regions_with_their_own_loras_each_change_their_own_side_most(realforge):
    """Left region with the LoCon, right region with the LoHa, 192x128: each LoRA changes its own
    third of the picture more than the other third, sampled in one pass and in a pass per region."""
    common = dict(COMMON, seed=9, steps=2, width=192, height=128)
    for passes in (False, True):
        without = pixels(realforge.txt2img("two friends", script_args=_sides(passes, [], []), **common)).astype(float)
        for side, (left, right) in (("left", ([{"name": "hero"}], [])), ("right", ([], [{"name": "bird"}]))):
            result = realforge.txt2img("two friends", script_args=_sides(passes, left, right), **common)
            change = np.abs(pixels(result) - without).mean(axis=(0, 2))  # per pixel column
            own, other = (change[:64].mean(), change[128:].mean()) if side == "left" else \
                (change[128:].mean(), change[:64].mean())
            print(f"passes={passes}: the {side} region's LoRA changes its own third by {own:.2f}, "
                  f"the other third by {other:.2f} ({other / own:.0%})")
            assert own > other


def test_batches_hires_and_cfg_1_keep_forges_rows_apart(realforge):
    """Forge puts uncond rows first, and at CFG scale 1 has none: a batch of two with hires fix, and
    one at CFG 1, each with regions and a bound concept, run and keep their regions."""
    spec = _sides(False, [{"name": "hero"}], [])
    # Forge's API needs hr_additional_modules with hires (its default None fails in Forge's own code)
    for fields in (dict(batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=1,
                        denoising_strength=0.5, hr_additional_modules=["Use same choices"]), dict(cfg_scale=1)):
        res = realforge.txt2img("two friends, <cat1> <cat2>", script_args=spec, **COMMON, **fields)
        info = infotexts(res)[0]
        print(fields, "->", len(images(res)), "images;", info[-300:])
        assert "Mix-of-Show regions" in info and "<cat1> <cat2> from cat.safetensors@" in info
    with pytest.raises(HostError) as exc:
        realforge.txt2img("a cat", script_args=whole(loras=[{"name": "heroo"}]), **COMMON)
    print("missing LoRA:", exc.value.body[:300])
    assert "no LoRA named 'heroo'" in exc.value.body


def test_img2img_binds_and_a_painted_mask_with_the_global_weight_round_trips(realforge):
    """img2img binds concept tokens; a painted mask (left red, right blue) with a share of the
    global prompt inside the regions places its regions like the same boxes do, and its infotext,
    read back by Forge's PNG Info, regenerates the same picture."""
    init = "data:image/png;base64," + encode_png(STATE["plain"])
    result = realforge.post("/sdapi/v1/img2img", dict(init_images=[init], prompt="<cat1> <cat2> in the rain", steps=2,
                                                      width=128, height=128, seed=5, denoising_strength=0.6,
                                                      sampler_name="Euler"))
    print("img2img infotext:", infotexts(result)[0])
    assert "cat.safetensors@" in infotexts(result)[0]

    mask = np.zeros((32, 32, 3))
    mask[:, :16] = (255, 0, 0)
    mask[:, 16:] = (0, 0, 255)
    painted = {"mask_image": encode_png(mask), "global_weight": 0.3, "regions": [
        {"prompt": "a photo of ohwx man", "color": "#ff0000", "loras": [{"name": "hero"}]},
        {"prompt": "a red bird", "color": "#0000ff"}]}
    boxes = {"global_weight": 0.3, "regions": [
        {"prompt": "a photo of ohwx man", "box": [0, 0, 1, 0.5], "units": "fraction", "loras": [{"name": "hero"}]},
        {"prompt": "a red bird", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
    by_mask = realforge.txt2img("two friends", script_args=[json.dumps(painted)], **COMMON)
    by_boxes = realforge.txt2img("two friends", script_args=[json.dumps(boxes)], **COMMON)
    difference = np.abs(pixels(by_mask) - pixels(by_boxes)).max()
    print(f"painted halves vs boxes: max pixel difference {difference}")
    assert difference <= 2
    parsed = realforge.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + by_mask["images"][0]})
    parameters = parsed["parameters"]
    print("PNG Info:", {k: v for k, v in parameters.items() if "Mix-of-Show" in k or k == "Script"})
    assert parameters["Script"] == "Mix-of-Show" and "mask_image" in parameters["Mix-of-Show regions"]
    again = realforge.txt2img("two friends", script_args=[parameters["Mix-of-Show regions"]], **COMMON)
    assert np.array_equal(pixels(again), pixels(by_mask))


def test_fusion_with_forges_python_and_the_checkpoint_loads(realforge):
    """Fusion with Forge's own Python from the extension's folder (the private `ldm` on its path), as
    the tab's child process runs it: two concept files into Forge's checkpoint folder; a generation on
    the result binds the concepts from the checkpoint. (The tab itself says it does not run in Forge
    yet: its concept table does not follow a selection of several files in gradio 4.)"""
    skeleton = sd1.build_sd15_skeleton()
    write_concept(synthetic.random_concept(skeleton, ("<dog1>", "<dog2>"), seed=6, name="dog"),
                  realforge.loras / "dog.safetensors", overwrite=True)
    out = realforge.checkpoints / "fused-forge.safetensors"
    start = time.perf_counter()
    proc = realforge.run_python("-m", "lib_mos", "fuse", "--base", str(realforge.checkpoints / "sd15-random.safetensors"),
                                "--out", str(out), "--spatial-steps", "1", "--spatial-size", "128", "--memory-gb", "6",
                                "--concept", str(realforge.loras / "cat.safetensors"),
                                "--concept", str(realforge.loras / "dog.safetensors"))
    print(f"fuse with Forge's Python ({time.perf_counter() - start:.0f} s):", proc.stdout[-1200:], proc.stderr[-800:])
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    realforge.post("/sdapi/v1/refresh-checkpoints")
    result = realforge.txt2img("a photo of <cat1> <cat2> and <dog1> <dog2>", seed=4,
                               override_settings={"sd_model_checkpoint": "fused-forge"})
    info = infotexts(result)[0]
    print("on the fused checkpoint:", info)
    assert "fused-forge" in info and "<cat1> <cat2> from the checkpoint" in info


def test_per_step_cost_of_four_regions_with_four_loras(realforge):
    """The README's figure: seconds per denoising step, plain Forge against 4 regions each with its
    own LoRA (one pass), 256x256, from the difference between 6 and 2 steps (load and VAE cancel)."""
    spec = [json.dumps({"regions": [
        {"prompt": f"a photo of thing {k}", "box": [k / 4, 0, (k + 1) / 4, 1], "units": "fraction",
         "loras": [{"name": "hero" if k % 2 else "bird", "weight": 0.5 + k / 8}]} for k in range(4)]})]
    runs = {"plain Forge": {}, "4 regions, 4 LoRAs": dict(script_name="mix-of-show", script_args=spec)}
    per_step = {}
    for label, extra in runs.items():
        seconds = {}
        for steps in (2, 6, 2, 6):
            start = time.perf_counter()
            realforge.txt2img("a photo of a street", seed=1, steps=steps, width=256, height=256, **extra)
            seconds.setdefault(steps, []).append(time.perf_counter() - start)
        per_step[label] = (min(seconds[6]) - min(seconds[2])) / 4
    print("seconds per step at 256x256 (CPU):", {k: round(v, 2) for k, v in per_step.items()},
          f"ratio {per_step['4 regions, 4 LoRAs'] / per_step['plain Forge']:.2f}")


def test_the_canvas_in_forges_page_and_the_tabs_messages(realforge):
    """Forge's page is gradio 4's: the Script dropdown's options are picked by their text. The canvas
    adds a region and writes it to the JSON; the fusion and training tabs say they do not run here yet.
    (PNG Info's "Send to txt2img" did not bring a painted spec back into the JSON within 60 s in
    Forge's page: not yet understood; the API's PNG Info round trip is checked above.)"""
    from browser import Browser

    with Browser() as browser:
        page = browser.page
        page.goto(realforge.url, timeout=120_000)
        page.click("#script_list input", timeout=120_000)
        page.locator("#script_list ul.options li", has_text=re.compile(r"Mix-of-Show\s*$")).first.click()
        try:
            page.click(".mos-canvas button:has-text('+ Region')", timeout=60_000)
        except Exception:
            print("no canvas; the panel:", page.evaluate(
                "() => (document.querySelector('#script_mixofshow_canvas') || {}).outerHTML"), browser.errors)
            page.screenshot(path=str(realforge.data / "forge-canvas-missing.png"))
            raise
        page.wait_for_function("() => (document.querySelector('#script_mixofshow_regions textarea') || {}).value"
                               "?.includes('regions')", timeout=30_000)
        spec = json.loads(page.evaluate("() => document.querySelector('#script_mixofshow_regions textarea').value"))
        print("canvas JSON:", spec)
        assert len(spec["regions"]) == 1
        page.screenshot(path=str(realforge.data / "forge-canvas.png"))
        for title, elem in (("Mix-of-Show fusion", "mos_fusion"), ("Mix-of-Show training", "mos_train")):
            page.click(f"#tabs > .tab-nav > button:has-text('{title}')", timeout=120_000)
            text = page.inner_text(f"#{elem}_unsupported", timeout=60_000)
            print(f"{title} tab:", text)
            assert TAB_MESSAGE.format(elem.split("_")[1].replace("train", "training")) in text
        ours = [e for e in browser.errors if "mix_of_show" in e.lower() or "mos" in e.lower()]
        print("console errors:", browser.errors[:5])
        assert not ours, ours


def test_plain_image_after_everything_is_identical(realforge):
    after = pixels(realforge.txt2img(**PLAIN))
    difference = np.abs(after - STATE["plain"]).max()
    print("plain image after: max pixel difference", difference)
    assert difference == 0
