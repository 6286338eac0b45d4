"""The extension in a real Forge with a random full-size SDXL base loaded, as a user drives it through
the API: SDXL concept tokens bind (a concept with equal rows draws Forge's own SDXL embedding's
picture), a whole-image region LoRA matches Forge's own Lora, two regions each change their own
side most, and the plain image is identical before and after. Forge holds about 18 GB for SDXL on
the CPU: run this module alone (`MOS_FORGE=<forge> make test-realforge-sdxl`).
"""

from __future__ import annotations

import json
import re
import time

import lora_layouts as layouts
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from webui_process import infotexts, pixels

from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import Concept
from lib_mos.concepts.files import write_concept
from lib_mos.models import sdxl
from lib_mos.models.family import SDXL

PLAIN = dict(prompt="a photo of a house by a lake", seed=7)
COMMON = dict(negative_prompt="dark", seed=5, script_name="mix-of-show")
STATE: dict = {}


@pytest.fixture(scope="module")
def files(realforge_xl):
    """SDXL files as users have them (random values), written before Forge loads the model (it
    loads embeddings with it): a kohya LoCon and a LyCORIS LoHa on every layer type of both text
    encoders and the UNet (of the 10-deep transformers only the first block, to fit this machine),
    an ED-LoRA concept, and a concept with equal rows beside an SDXL embedding of the same vectors."""
    skeleton = sdxl.build_sdxl_skeleton()

    def lighter(lora: layouts.LoraFile) -> layouts.LoraFile:
        return layouts.LoraFile({k: v for k, v in lora.tensors.items() if not re.search(r"transformer_blocks_[1-9]", k)},
                                lora.metadata)

    loras = realforge_xl.loras
    hero = lighter(layouts.kohya_locon(skeleton, few=True, seed=1)).save(loras, "hero-xl")
    layouts.write_sidecar(hero, "ohwx man")
    lighter(layouts.loha(skeleton, few=True, seed=2)).save(loras, "bird-xl")
    write_concept(synthetic.random_concept(skeleton, ("<dogxl1>", "<dogxl2>"), seed=3, name="dog-xl", unet_names=[],
                                           text_names=[]), loras / "dog-xl.safetensors", overwrite=True)
    vectors = torch.randn(2, 2048, generator=torch.Generator().manual_seed(8)) * 0.3
    twin = Concept(name="twin-xl", tokens=("<twinxl1>", "<twinxl2>"),
                   embeddings=vectors.unsqueeze(1).expand(-1, SDXL.layers, -1).contiguous(), family=SDXL)
    write_concept(twin, loras / "twin-xl.safetensors", overwrite=True)
    realforge_xl.embeddings.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": vectors[:, :768].clone(), "clip_g": vectors[:, 768:].clone()},
              str(realforge_xl.embeddings / "twinxl.safetensors"))
    return loras


def test_plain_image_before(realforge_xl, files):
    start = time.perf_counter()
    STATE["plain"] = pixels(realforge_xl.txt2img(**PLAIN))
    print(f"Forge SDXL plain 128x128, 2 steps: {time.perf_counter() - start:.1f} s (model load included); "
          f"RSS {realforge_xl.rss_bytes() / 2**30:.1f} GiB")
    assert STATE["plain"].shape == (128, 128, 3)


def test_the_lora_route_lists_the_sdxl_files(realforge_xl):
    listing = realforge_xl.get("/mix-of-show/loras")
    print("route:", [e["name"] for e in listing["loras"]], listing["family"])
    assert listing["family"] == "sdxl" and {"hero-xl", "bird-xl", "dog-xl"} <= {e["name"] for e in listing["loras"]}


def test_sdxl_concept_tokens_bind_and_equal_rows_give_the_embeddings_picture(realforge_xl):
    bound = realforge_xl.txt2img("a photo of <dogxl1> <dogxl2> on grass", seed=7)
    info = infotexts(bound)[0]
    print("infotext:", info)
    assert "Mix-of-Show concepts: <dogxl1> <dogxl2> from dog-xl.safetensors@" in info
    ours = pixels(realforge_xl.txt2img("a photo of <twinxl1> <twinxl2>", seed=3))
    theirs = realforge_xl.txt2img("a photo of twinxl", seed=3)
    difference = np.abs(ours - pixels(theirs)).max()
    print(f"SDXL equal-row concept vs Forge's embedding: max pixel difference {difference}; "
          f"infotext {infotexts(theirs)[0][-200:]}")
    assert "twinxl" in infotexts(theirs)[0] and difference <= 2
    assert "mosbind" not in info + infotexts(theirs)[0]


def whole(**region) -> list[str]:
    return [json.dumps({"regions": [{"prompt": "a photo of ohwx man", "negative": "dark", "box": [0, 0, 1, 1],
                                     "units": "fraction", **region}]})]


def test_a_whole_image_region_lora_matches_forges_own_lora(realforge_xl):
    ours = realforge_xl.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero-xl"}]), **COMMON)
    forge = realforge_xl.txt2img("<lora:hero-xl:1> a photo of ohwx man", script_args=whole(), **COMMON)
    plain = realforge_xl.txt2img("a photo of ohwx man", script_args=whole(), **COMMON)
    assert 'Mix-of-Show region LoRAs: "region 0: hero-xl 1"' in infotexts(ours)[0]
    diff = np.abs(pixels(ours) - pixels(forge)).max()
    effect = np.abs(pixels(plain) - pixels(forge)).max()
    print(f"SDXL whole-image region LoRA vs Forge's <lora:hero-xl:1>: max pixel difference {diff}; "
          f"the LoRA's own effect {effect}")
    assert diff <= 2 and effect > 10


def test_two_regions_each_change_their_own_side_most(realforge_xl):
    two = {"regions": [{"prompt": "a photo of ohwx man", "box": [0, 0, 1, 0.5], "units": "fraction"},
                       {"prompt": "a photo of zkq bird", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
    without = pixels(realforge_xl.txt2img("two friends", script_args=[json.dumps(two)], **COMMON))
    for label, region, name in (("LoCon left", 0, "hero-xl"), ("LoHa right", 1, "bird-xl")):
        spec = json.loads(json.dumps(two))
        spec["regions"][region]["loras"] = [{"name": name}]
        change = np.abs(pixels(realforge_xl.txt2img("two friends", script_args=[json.dumps(spec)], **COMMON))
                        - without).mean(axis=(0, 2))
        own, other = (change[:64].mean(), change[64:].mean()) if region == 0 else (change[64:].mean(), change[:64].mean())
        print(f"{label} ({name}): mean pixel change on its own side {own:.2f}, on the other side {other:.2f}")
        assert own > other


def test_plain_image_after_everything_is_identical(realforge_xl):
    after = pixels(realforge_xl.txt2img(**PLAIN))
    difference = np.abs(after - STATE["plain"]).max()
    print("SDXL plain image after: max pixel difference", difference)
    assert difference == 0
