"""The extension in a real Forge Classic (Haoming02's, branch `classic`), driven through the API:
concept tokens bind (a concept with equal rows draws the host's own embedding's picture), a
whole-image region LoRA matches Forge Classic's own Lora, two regions each change their own side
most, a batch and CFG 1 keep Forge's rows apart, and the plain image is pixel-identical before and
after (`MOS_FORGE_CLASSIC=<folder> make test-realforge-classic`; docs/testing.md says how it is
built offline).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_realforge import COMMON, _sides, whole, write_user_files
from webui_process import images, infotexts, pixels

PLAIN = dict(prompt="a photo of a house by a lake", seed=7)
STATE: dict = {}


@pytest.fixture(scope="module")
def files(realforge_classic):
    write_user_files(realforge_classic)
    realforge_classic.post("/sdapi/v1/refresh-loras")
    return realforge_classic.loras


def test_plain_image_before(realforge_classic, files):
    start = time.perf_counter()
    STATE["plain"] = pixels(realforge_classic.txt2img(**PLAIN))
    print(f"Forge Classic SD1.5 plain 128x128, 2 steps: {time.perf_counter() - start:.1f} s; "
          f"RSS {realforge_classic.rss_bytes() / 2**30:.1f} GiB")
    assert STATE["plain"].shape == (128, 128, 3)


def test_the_console_has_no_traceback_of_the_extension(realforge_classic):
    log = realforge_classic.log_text()
    assert "does not run in" not in log
    chunks = log.split("Traceback (most recent call last)")[1:]
    ours = [c[:1500] for c in chunks if "mix-of-show" in c.lower() or "mos_" in c]
    assert not ours, ours


def test_concept_tokens_bind_and_equal_rows_give_the_embeddings_picture(realforge_classic, files):
    res = realforge_classic.txt2img("a photo of <cat1> <cat2>", seed=3)
    info = infotexts(res)[0]
    print("infotext:", info)
    assert "Mix-of-Show concepts: <cat1> <cat2> from cat.safetensors@" in info
    ours = pixels(realforge_classic.txt2img("a photo of <twin1> <twin2>", seed=3))
    theirs = realforge_classic.txt2img("a photo of twincat", seed=3)
    difference = np.abs(ours - pixels(theirs)).max()
    print(f"equal-row concept vs Forge Classic's textual inversion: max pixel difference {difference}; "
          f"{infotexts(theirs)[0][-160:]}")
    assert "twincat" in infotexts(theirs)[0]  # the host's own embedding was used
    assert difference <= 2 and "mosbind" not in info + infotexts(theirs)[0]


def test_a_whole_image_region_lora_matches_the_hosts_own_lora(realforge_classic):
    ours = realforge_classic.txt2img("a photo of ohwx man", script_args=whole(loras=[{"name": "hero"}]), **COMMON)
    hosts = realforge_classic.txt2img("<lora:hero:1> a photo of ohwx man", script_args=whole(), **COMMON)
    plain = realforge_classic.txt2img("a photo of ohwx man", script_args=whole(), **COMMON)
    assert 'Mix-of-Show region LoRAs: "region 0: hero 1"' in infotexts(ours)[0]
    diff = np.abs(pixels(ours) - pixels(hosts)).max()
    print(f"whole-image region LoRA vs Forge Classic's <lora:hero:1>: max pixel difference {diff}; "
          f"its own effect {np.abs(pixels(plain) - pixels(hosts)).max()}")
    assert diff <= 2 and not np.array_equal(pixels(plain), pixels(hosts))


def test_two_regions_each_change_their_own_side_most(realforge_classic):
    common = dict(COMMON, seed=9, steps=2, width=192, height=128)
    without = pixels(realforge_classic.txt2img("two friends", script_args=_sides(False, [], []), **common))
    for side, (left, right) in (("left", ([{"name": "hero"}], [])), ("right", ([], [{"name": "bird"}]))):
        result = realforge_classic.txt2img("two friends", script_args=_sides(False, left, right), **common)
        change = np.abs(pixels(result) - without).mean(axis=(0, 2))
        own, other = (change[:64].mean(), change[128:].mean()) if side == "left" else \
            (change[128:].mean(), change[:64].mean())
        print(f"the {side} region's LoRA changes its own third by {own:.2f}, the other third by {other:.2f}")
        assert own > other


def test_a_batch_and_cfg_1_keep_the_rows_apart(realforge_classic):
    spec = _sides(False, [{"name": "hero"}], [])
    for fields in (dict(batch_size=2), dict(cfg_scale=1), dict(batch_size=2, script_args=[json.dumps(
            json.loads(spec[0]) | {"passes": True})])):
        res = realforge_classic.txt2img("two friends, <cat1> <cat2>", **(COMMON | {"script_args": spec} | fields))
        info = infotexts(res)[0]
        print({k: v for k, v in fields.items() if k != "script_args"}, "->", len(images(res)), "images")
        assert "Mix-of-Show regions" in info and "<cat1> <cat2> from cat.safetensors@" in info


def test_plain_image_after_everything_is_identical(realforge_classic):
    after = pixels(realforge_classic.txt2img(**PLAIN))
    difference = np.abs(after - STATE["plain"]).max()
    print("plain image after: max pixel difference", difference)
    assert difference == 0
