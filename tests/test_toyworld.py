"""The toy world: generator, codec, probes, the committed weights and the measurements on them.

The committed weights are part of the repository (lib_mos/toyworld/weights), so these tests use
them directly; the sampling ones use few seeds and steps and stay within seconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib_mos.concepts.concept import applied
from lib_mos.fusion import pipeline as fusion
from lib_mos.models import sd1
from lib_mos.models.family import attn2_modules
from lib_mos.regional.loras import RegionLora
from lib_mos.regional.regions import Region, RegionSpec
from lib_mos.toyworld import base, measure, novel, probe, weights, world
from lib_mos.toyworld.codec import SD_PIXELS, PatchCodec, to_tensor


@pytest.fixture(scope="module")
def toy() -> weights.ToyWorld:
    return weights.load()


# ------------------------------------------------------------------------------------ world


def test_batches_are_deterministic_by_seed():
    a, scenes_a = world.batch(7, 6, two_fraction=0.5)
    b, scenes_b = world.batch(7, 6, two_fraction=0.5)
    c, _ = world.batch(8, 6, two_fraction=0.5)
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_render_paints_the_named_colour_shape_and_texture():
    red = world.render(world.Scene((world.Thing("circle", "red", cx=16, cy=16, r=9),), "black"))
    assert np.allclose(red[16, 16], world.COLOURS["red"], atol=1e-6)
    assert np.allclose(red[1, 1], (0.03, 0.03, 0.03), atol=1e-6)  # background corner
    area = world.coverage("circle", 16, 16, 9).sum()
    assert abs(area - np.pi * 81) < 0.03 * np.pi * 81
    square = world.coverage("square", 16, 16, 9).sum()
    assert abs(square - (2 * 0.82 * 9) ** 2) < 0.05 * square
    tri = world.coverage("triangle", 16, 16, 9)
    assert tri[8:16].sum() < tri[16:24].sum()  # apex up: narrower on top
    striped = world.render(world.Scene((world.Thing("square", "blue", "striped", cx=16, cy=16, r=10),), "black"))
    col = striped[12:24, 16, 2]
    assert col[0] > 0.9 and col[2] < 0.4 and col[4] > 0.9  # rows 12-13 light, 14-15 dark, 16-17 light


def test_captions_name_objects_left_to_right():
    rng = np.random.default_rng(3)
    scene = world.random_scene(rng, 2)
    left, right = scene.things
    assert left.cx + left.r <= 16 + 0.5 <= right.cx - right.r + 1
    assert scene.caption() == f"a {left.words()} and a {right.words()}"
    assert world.Scene((world.Thing("cross", "green", "plain"),)).caption() == "a green cross"
    with pytest.raises(ValueError, match="novel-style"):
        world.Scene((world.Thing("circle", style="rings"),)).caption()


# ------------------------------------------------------------------------------------ codec


def test_codec_round_trip_and_the_trainer_interface():
    codec = PatchCodec.load(weights.WEIGHTS / weights.CODEC)
    images, _ = world.batch(11, 32, two_fraction=0.3)
    x = to_tensor(images)
    z = codec.encode(x)
    assert z.shape == (32, 4, 16, 16)
    assert 0.4 < float(z.std()) < 1.6  # whitened: about unit variance, like SD latents
    assert float((codec.decode(z) - x).abs().mean()) < 0.05
    # the trainer sees 128-px pictures (4x nearest): its encoder must give the same latents
    up = F.interpolate(x, scale_factor=SD_PIXELS // world.SIZE, mode="nearest")
    mean, std = codec.encoder()(up)
    assert torch.allclose(mean, z, atol=1e-5) and not std.any()
    refit = PatchCodec.fit()
    assert torch.allclose(refit.basis, codec.basis, atol=1e-4)  # the committed codec is the documented fit


# ------------------------------------------------------------------------------------ probes


def test_probes_read_held_out_renders():
    codec = PatchCodec.load(weights.WEIGHTS / weights.CODEC)
    attributes, info = probe.Probe.load(weights.WEIGHTS / weights.ATTRIBUTE_PROBE)
    concepts, _ = probe.Probe.load(weights.WEIGHTS / weights.CONCEPT_PROBE)
    assert min(info["augmented"].values()) >= 0.99  # what train-probes measured on 2000 renders
    acc = probe.held_out_accuracy(attributes, probe.attribute_batch, codec, n=400, seed=777)
    assert min(acc.values()) >= 0.98, acc
    acc = probe.held_out_accuracy(concepts, probe.concept_batch, codec, n=400, seed=778)
    assert acc["concept"] >= 0.98, acc
    # they read what is there: a blue picture is not called red
    blue = to_tensor(world.render(world.Scene((world.Thing("square", "blue", cx=16, cy=16, r=9),)))[None])
    assert attributes.predict(blue)["colour"][0] == list(world.COLOURS).index("blue")


def test_wide_canvases_hold_one_object_per_cell_captioned_left_to_right():
    images, scenes = world.batch(3, 4, cells=3)
    assert images.shape == (4, 32, 96, 3)
    for scene in scenes:
        assert scene.width == 96 and len(scene.things) == 3
        assert all(i * 32 < t.cx - t.r and t.cx + t.r < (i + 1) * 32 for i, t in enumerate(scene.things))
        assert scene.caption() == " and ".join(f"a {t.words()}" for t in scene.things)
    # each cell is the picture of its object alone (plain and grid backgrounds repeat every 32 px)
    thing = world.Thing("triangle", "blue", "checked", cx=40.0, cy=14.0, r=9.0)
    other = world.Thing("circle", "red", "striped", cx=15.0, cy=17.0, r=8.0)
    for background in ("grey", "grid"):
        wide = world.render(world.Scene((other, thing), background, width=64))
        alone = world.render(world.Scene((world.Thing("triangle", "blue", "checked", cx=8.0, cy=14.0, r=9.0),),
                                         background))
        np.testing.assert_array_equal(wide[:, 32:], alone)
    with pytest.raises(ValueError, match="base objects only"):
        world.batch(3, 2, cells=2, style="rings")


def test_the_attribute_probe_scores_placement_per_cell(toy):
    """Renders of what was asked score 100%, the mirrored order (and a doubled object) not."""
    rng = np.random.default_rng(0)
    objects = [[world.random_thing(rng, r_range=(7.0, 10.0)) for _ in range(2)] for _ in range(16)]
    objects = [row for row in objects if row[0].shape != row[1].shape][:8]
    pics = to_tensor(np.stack([world.render(world.Scene(
        tuple(dataclasses.replace(t, cx=t.cx + 32 * i) for i, t in enumerate(row)), "black", width=64))
        for row in objects]))
    right = measure.objects_placed(toy.attribute_probe, pics, objects)
    assert right["placement"] == 1.0 and right["one_object_per_region"] == 1.0, right
    assert measure.objects_placed(toy.attribute_probe, pics, [row[::-1] for row in objects])["placement"] == 0.0
    doubled = pics.clone()
    doubled[..., 32:] = to_tensor(np.stack([world.render(world.Scene(
        (dataclasses.replace(row[1], cx=9.0, r=6.0), dataclasses.replace(row[1], cx=24.0, r=6.0)), "black"))
        for row in objects]))
    assert measure.objects_placed(toy.attribute_probe, doubled, objects)["one_object_per_region"] < 0.5


def test_a_region_spec_per_picture_samples_as_each_spec_alone(toy):
    """`pictures` with one spec per picture gives each picture what its own spec gives it."""
    def spec(left: str, right: str) -> RegionSpec:
        return RegionSpec((Region(left, box=(0.0, 0.0, 1.0, 0.5), units="fraction"),
                           Region(right, box=(0.0, 0.5, 1.0, 1.0), units="fraction")))

    a, b = spec("a red circle", "a blue square"), spec("a green cross", "a yellow triangle")
    sampler = measure.Sampler(steps=3)
    both = measure.pictures(toy.model, toy.codec, ["x", "y"], [1, 2], sampler=sampler, cells=2, spec=[a, b])
    alone_a = measure.pictures(toy.model, toy.codec, ["x"], [1], sampler=sampler, cells=2, spec=a)
    alone_b = measure.pictures(toy.model, toy.codec, ["y"], [2], sampler=sampler, cells=2, spec=b)
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), rtol=1e-4, atol=1e-4)
    swapped = measure.pictures(toy.model, toy.codec, ["x", "y"], [1, 2], sampler=sampler, cells=2, spec=[b, a])
    assert not torch.allclose(swapped, both, atol=1e-2)


def test_the_specs_global_weight_reaches_the_regions(toy):
    """A spec keeping all of the global prompt inside its regions samples as no regions at all;
    half of it, as neither."""
    def spec(weight: float) -> RegionSpec:
        return RegionSpec((Region("a red circle", box=(0.0, 0.0, 1.0, 0.5), units="fraction"),
                           Region("a blue square", box=(0.0, 0.5, 1.0, 1.0), units="fraction")), global_weight=weight)

    sampler, prompt = measure.Sampler(steps=3), ["a green cross and a yellow triangle"]
    plain = measure.pictures(toy.model, toy.codec, prompt, [1], sampler=sampler, cells=2)
    kept = measure.pictures(toy.model, toy.codec, prompt, [1], sampler=sampler, cells=2, spec=spec(1.0))
    torch.testing.assert_close(kept, plain, rtol=1e-4, atol=1e-4)
    regions = measure.pictures(toy.model, toy.codec, prompt, [1], sampler=sampler, cells=2, spec=spec(0.0))
    half = measure.pictures(toy.model, toy.codec, prompt, [1], sampler=sampler, cells=2, spec=spec(0.5))
    assert (half - plain).abs().max() > 1e-2 and (half - regions).abs().max() > 1e-2


def test_region_passes_in_the_bench_sample_each_concept_in_its_own_pass(toy):
    """The bench's `passes`: without region LoRAs it is the one pass; with them, the left square
    after one step does not depend on the right square's LoRA (it does in one pass)."""
    prompt, spec = measure.side_by_side(toy.concepts[:2], toy.classes[:2])
    kwargs = dict(concepts=toy.concepts, sampler=measure.Sampler(steps=1), cells=2, spec=spec)

    def sample(right: int, passes: bool) -> torch.Tensor:
        loras = [RegionLora(0, toy.concepts[0], 1.0, "left"), RegionLora(1, toy.concepts[right], 1.0, "right")]
        return measure.pictures(toy.model, toy.codec, [prompt], [2], region_loras=loras, passes=passes, **kwargs)

    plain = measure.pictures(toy.model, toy.codec, [prompt], [2], **kwargs)
    assert torch.equal(measure.pictures(toy.model, toy.codec, [prompt], [2], passes=True, **kwargs), plain)
    left = (..., slice(0, 24))  # the codec's reach across the edge stays out
    assert torch.equal(sample(1, True)[left], sample(2, True)[left])
    assert (sample(1, False)[left] - sample(2, False)[left]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ base model


def test_committed_base_is_an_sd1_model_under_30_mb(toy):
    path = weights.WEIGHTS / weights.BASE
    assert path.stat().st_size < 30e6
    assert [n for n, _ in attn2_modules(toy.model.unet)] == list(sd1.ATTN2_NAMES)
    assert toy.model.config == base.BASE_CONFIG


def test_base_draws_what_the_caption_says(toy):
    things = [world.Thing("circle", "red", "plain"), world.Thing("square", "blue", "striped"),
              world.Thing("triangle", "yellow", "checked"), world.Thing("cross", "green", "plain")]
    prompts = [f"a {t.words()}" for t in things]
    pics = measure.pictures(toy.model, toy.codec, prompts, [5, 6, 7, 8], sampler=measure.Sampler(steps=20))
    pred = toy.attribute_probe.predict(pics)
    colours = [list(world.COLOURS).index(t.colour) for t in things]
    shapes = [world.SHAPES.index(t.shape) for t in things]
    assert (pred["colour"] == colours).sum() >= 3, pred
    assert (pred["shape"] == shapes).sum() >= 3, pred


@pytest.mark.parametrize("wide", [False, True], ids=["32x32", "wide canvases from the committed base"])
def test_base_training_resumes_exactly(tmp_path, wide):
    s = base.BaseSettings(steps=3, batch_size=2, warmup=2, save_every=1000, snapshot_every=1000)
    if wide:
        s = dataclasses.replace(s, batch_size=6, wide_fraction=1.0, single_only_fraction=0.0,
                                init=str(weights.WEIGHTS / weights.BASE))
        assert {s.cells_at(i) for i in range(3)} <= {2, 3}
        latents, captions = base.training_batch(s, 0, PatchCodec.load(weights.WEIGHTS / weights.CODEC))
        cells = s.cells_at(0)
        assert latents.shape == (6 // cells, 4, 16, 16 * cells) and len(captions) == 6 // cells
    straight = base.BaseTrainer(tmp_path / "a", s)
    if wide:  # starts from the checkpoint's weights
        start = base.load_base(weights.WEIGHTS / weights.BASE).unet.state_dict()
        assert all(torch.equal(straight.model.unet.state_dict()[k], v) for k, v in start.items())
    for _ in range(3):
        straight.train_step()
    (tmp_path / "b").mkdir()
    first = base.BaseTrainer(tmp_path / "b", s)
    for _ in range(2):
        first.train_step()
    first.save_state()
    resumed = base.BaseTrainer(tmp_path / "b", s)
    resumed.load_state()
    assert resumed.step == 2
    resumed.train_step()
    for k, p in straight.params.items():
        assert torch.equal(p, resumed.params[k]), k
        assert torch.equal(straight.ema[k], resumed.ema[k]), k


def test_resume_refuses_other_settings(tmp_path):
    s = base.BaseSettings(steps=2, batch_size=2)
    t = base.BaseTrainer(tmp_path, s)
    t.save_state()
    other = base.BaseTrainer(tmp_path, base.BaseSettings(steps=2, batch_size=2, lr=1e-3))
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        other.load_state()


# ------------------------------------------------------------------------------------ concepts


def test_concept_is_recognised_only_with_its_lora_and_tokens(toy):
    label = 0
    concept = toy.concepts[label]
    sampler = measure.Sampler(steps=20)
    with applied([(concept, 1.0, 1.0)], toy.model.unet, toy.model.text_encoder):
        tuned = measure.identity_rate(toy.model, toy.codec, toy.concept_probe, [concept], [label], seeds=4,
                                      sampler=sampler)[0]
    plain = measure.pictures(toy.model, toy.codec, [f"a {toy.classes[label]}"] * 4, list(range(2000, 2004)),
                             sampler=sampler)
    untuned = float((toy.concept_probe.predict(plain)["concept"] == label).mean())
    assert tuned >= 0.75 and untuned <= 0.25, (tuned, untuned)


def test_training_images_are_the_concepts_renders():
    imgs = novel.training_images(novel.NOVEL[1])
    assert len(imgs) == novel.IMAGES_PER_CONCEPT
    assert all(i.image.size == (SD_PIXELS, SD_PIXELS) and "<TOK>" in i.caption for i in imgs)
    assert novel.NOVEL[1].tokens == ("<frame1>", "<frame2>") and novel.NOVEL[1].class_word == "square"
    assert all(i.mask is None for i in imgs)


def test_the_authors_recipe_trains_on_subject_masks():
    """Masked images: the mask covers the object (where the picture differs from its background)."""
    concept = novel.NOVEL[0]
    masked = novel.training_images(concept, masks=True)
    plain = novel.training_images(concept)
    for m, p in zip(masked, plain):
        assert m.image.tobytes() == p.image.tobytes() and m.mask.size == m.image.size and m.mask.mode == "L"
        pixels, mask = np.asarray(m.image, dtype=np.float32), np.asarray(m.mask) / 255.0
        corner = pixels[0, 0]  # objects never reach the corners (faint background patterns differ a little)
        differs = np.abs(pixels - corner).max(axis=-1) > 0.2 * 255
        assert mask[differs].mean() > 0.8 and mask[~differs].mean() < 0.1
    s = novel.settings(concept, recipe_name="authors")
    assert (s.lr_embedding, s.lr_text, s.lr_unet, s.attn_reg_weight) == (1e-3, 1e-5, 1e-4, 0.01)
    assert novel.settings(concept, steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown recipe"):
        novel.recipe(concept, "nope")


def test_identity_parts_split_the_unet_lora_at_attn2_k_v(toy):
    concept = toy.concepts[0]
    parts = {p: set(measure.concept_part(concept, p).unet_lora) for p in measure.IDENTITY_PARTS}
    assert parts["tokens"] == set() and parts["all"] == set(concept.unet_lora)
    assert parts["kv"] | parts["spatial"] == parts["all"] and not parts["kv"] & parts["spatial"]
    assert parts["kv"] and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in parts["kv"])
    assert any(".attn1." in n for n in parts["spatial"])
    assert measure.concept_part(concept, "kv").text_lora == concept.text_lora


def test_placement_is_read_per_region(toy):
    """Each square of a composition is read on its own: the right order scores, the mirrored one not."""
    def square(style: str, cx: float) -> np.ndarray:
        return world.render(world.Scene((world.Thing(world.STYLES[style][0], style=style, cx=cx, cy=15, r=9),), "navy"))

    pics = torch.stack([to_tensor(np.concatenate([square("rings", 15), square("frame", 17)], axis=1)[None])[0],
                        to_tensor(np.concatenate([square("frame", 16), square("rings", 16)], axis=1)[None])[0]])
    assert pics.shape == (2, 3, 32, 64)
    assert list(measure.placed(toy.concept_probe, pics, [0, 1])) == [True, False]
    assert list(measure.placed(toy.concept_probe, pics, [1, 0])) == [False, True]


def test_regional_sampling_draws_each_concept_in_its_square(toy):
    """Composition through the product's regional attention (averaged LoRAs): some pictures right."""
    pair = toy.concepts[:2]
    with applied([(c, 0.5, 0.5) for c in pair], toy.model.unet, toy.model.text_encoder):
        rate, pics = measure.placement_rate(toy.model, toy.codec, toy.concept_probe, pair, [0, 1], toy.classes[:2],
                                            seeds=8, sampler=measure.Sampler(steps=20))
    assert pics.shape == (8, 3, 32, 64)
    mirrored = float(measure.placed(toy.concept_probe, pics, [1, 0]).mean())
    assert rate > mirrored, (rate, mirrored)


def test_region_loras_draw_each_concept_in_its_square_with_nothing_merged(toy):
    """Each concept's LoRA inside its own region only (the product's region LoRAs, one pass): some
    pictures right, more than mirrored, and the model's weights untouched."""
    pair = toy.concepts[:2]
    before = {k: v.clone() for k, v in toy.model.unet.state_dict().items()}
    rate, pics = measure.placement_rate(toy.model, toy.codec, toy.concept_probe, pair, [0, 1], toy.classes[:2],
                                        seeds=8, sampler=measure.Sampler(steps=20), region_loras=True)
    mirrored = float(measure.placed(toy.concept_probe, pics, [1, 0]).mean())
    assert rate > mirrored, (rate, mirrored)
    assert measure.region_reads(toy.concept_probe, pics, [0, 1]).shape == (2, 8)
    assert all(torch.equal(v, before[k]) for k, v in toy.model.unet.state_dict().items())


def test_layouts_tile_or_leave_a_background():
    tiling = measure.Layout().boxes(3)
    assert tiling == [(0.0, 0.0, 1.0, 1 / 3), (0.0, 1 / 3, 1.0, 2 / 3), (0.0, 2 / 3, 1.0, 1.0)]
    top, left, bottom, right = measure.Layout(margin=0.25).boxes(2)[1]
    assert (top, left, bottom, right) == (0.25, 0.625, 0.75, 0.875)
    spec = measure.Layout(global_weight=0.5).spec(["a", "b"])
    assert spec.global_weights() == [0.5, 0.5] and [r.prompt for r in spec.regions] == ["a", "b"]


def test_a_region_loras_spill_is_measured_against_its_own_square(toy, monkeypatch):
    """Spill = the change outside the LoRA's square over the change inside it, per concept: here
    concept 0's LoRA changes its own (left) square by 4 and the right one by 1, concept 1's LoRA
    changes both by 2."""
    def fake(model, codec, prompts, seeds, *, region_loras=(), cells=1, **kwargs):
        pics = torch.zeros(len(prompts), 3, 32, 32 * cells)
        for lora in region_loras:
            if lora.region == 0:
                pics[..., :32] += 4.0
                pics[..., 32:] += 1.0
            else:
                pics += 2.0
        return pics

    monkeypatch.setattr(measure, "pictures", fake)
    spill = measure.region_lora_spill(toy.model, toy.codec, toy.concepts[:2], toy.classes[:2], seeds=2)
    assert spill == [0.25, 1.0]


def test_shares_come_with_wilsons_interval():
    low, high = measure.interval(16, 32)
    assert (round(low, 3), round(high, 3)) == (0.336, 0.664)
    assert measure.interval(0, 8)[0] == 0.0 and measure.interval(8, 8)[1] == 1.0


def test_fused_weights_are_applied_and_restored(toy):
    model = toy.model
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    name = sd1.ATTN2_NAMES[0] + ".to_k"
    new = torch.zeros_like(model.unet.get_submodule(name).weight)
    result = fusion.FusionResult(unet_weights={name: new})
    with fusion.fused_weights(model, result):
        assert torch.equal(model.unet.get_submodule(name).weight, new)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
