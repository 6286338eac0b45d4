"""The ED-LoRA trainer on the tiny model with generated pictures: it learns (loss down, rows move),
leaves every weight of the model and every other embedding row bit-identical, stops the rows at the
authors' 0.55 mean norm, writes a concept that reads back, binds exactly as it trained and fuses;
N steps equal N/2 + resume N/2; an interrupt leaves the last checkpoint or nothing."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lib_mos.concepts import binding
from lib_mos.concepts import concept as concepts
from lib_mos.concepts.files import read_concept
from lib_mos.fusion import pipeline as fusion
from lib_mos.models import sd1, vae
from lib_mos.models.attention import LayerwiseContext, attn2_processor
from lib_mos.training import trainer as training
from lib_mos.training.data import read_training_folder
from lib_mos.training.trainer import TrainingError, TrainingInterrupted, TrainSettings, state_path, train

TOKENS = ("<disc1>", "<disc2>")
BASE = TrainSettings(tokens=TOKENS, class_word="ball", steps=60, batch_size=2, resolution=64, lr_unet=2e-3,
                     lr_text=1e-4, lr_embedding=1e-2, templates="object", views_per_image=4, seed=3)


def write_discs(folder: Path, n: int = 4, *, masks: bool = True) -> Path:
    """Red discs on coloured grounds, captions with the class word, a mask per disc."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ground = (20 + 50 * k, 40, 200 - 40 * k)
        box = (8 + 4 * k, 10, 44 + 4 * k, 50)
        img = Image.new("RGB", (64, 64), ground)
        ImageDraw.Draw(img).ellipse(box, fill=(220, 30, 30))
        img.save(folder / f"disc{k}.png")
        (folder / f"disc{k}.txt").write_text("a red ball, on a plain ground")
        if masks:
            mask = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            mask.save(folder / f"disc{k}_mask.png")
    return folder


def model_hash(model: sd1.SD1Model) -> str:
    h = hashlib.sha256()
    for root in (model.unet, model.text_encoder):
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return read_training_folder(write_discs(tmp_path_factory.mktemp("discs")), class_word="ball")


@pytest.fixture(scope="module")
def run(tiny, images, tmp_path_factory):
    """One 60-step run: its losses, norms, the trainer's own prediction on a fixed input, the file."""
    out = tmp_path_factory.mktemp("out") / "disc.safetensors"
    before = model_hash(tiny)
    losses, norms, seen = [], [], {}
    real_step = training.ConceptTrainer.train_step

    def spy(self):
        seen["trainer"] = self
        loss, norm = real_step(self)
        losses.append(loss)
        norms.append(norm)
        return loss, norm

    training.ConceptTrainer.train_step = spy
    try:
        concept = train(tiny, BASE, images, out, encoder=vae.PreviewEncoder())
    finally:
        training.ConceptTrainer.train_step = real_step
    return {"out": out, "concept": concept, "losses": losses, "norms": norms, "before": before,
            "trainer": seen["trainer"]}


def test_loss_decreases_and_rows_move(run):
    losses = run["losses"]
    assert len(losses) == 60
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.97 * first, (first, last)
    rows = run["concept"].embeddings
    assert rows.shape == (2, 16, 32)
    table = run["trainer"].model.text_encoder.get_input_embeddings().weight
    ball = run["trainer"].model.tokenizer("ball", add_special_tokens=False)["input_ids"][0]
    moved = (rows[1] - table[ball]).norm(dim=-1)  # the class-word token, started at "ball" in every layer
    assert moved.min() > 1e-3
    assert (rows[0] - rows[0, :1]).norm(dim=-1)[1:].min() > 1e-4  # each layer's row learns on its own


def test_initial_rows_follow_the_recipe(tiny, images):
    """First token N(0, 0.013^2) per row, the last the class word's embedding, the same in all 16 layers."""
    trainer = training.ConceptTrainer(tiny, BASE, images, encoder=vae.PreviewEncoder())
    rows = trainer.rows.detach()
    table = tiny.text_encoder.get_input_embeddings().weight
    ball = tiny.tokenizer("ball", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(rows[1], table[ball].expand(16, -1))
    assert torch.equal(rows[0], rows[0, :1].expand(16, -1))
    assert 0.005 < rows[0, 0].std() < 0.03
    bad = dataclasses.replace(BASE, class_word="sea lion")
    with pytest.raises(TrainingError, match=r"'class_word'.*2 tokens"):
        training.ConceptTrainer(tiny, bad, images, encoder=vae.PreviewEncoder())


def test_model_and_every_other_embedding_row_are_bit_identical(run, tiny):
    """The LoRA lives in hooks and the rows are injected, so nothing of the model moved, including
    the whole token embedding table (the authors reset the non-concept rows every step)."""
    assert model_hash(tiny) == run["before"]
    assert all(p.requires_grad for p in tiny.unet.parameters())  # flags put back
    assert not any(m._forward_hooks for m in tiny.unet.modules())


def test_the_file_binds_exactly_as_it_trained(run, tiny):
    """The written concept, applied and bound the product's way (weights + layer-wise rows), gives
    the trainer's own prediction: same LoRA scale, layer names, row order."""
    concept = read_concept(run["out"])
    assert concept.tokens == TOKENS and concept.class_word == "ball" and concept.rank == 4
    assert len(concept.unet_lora) == 128 and len(concept.text_lora) == 48
    trainer = run["trainer"]
    prompt = "a photo of <disc1> <disc2> on a table"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        with trainer.installed():
            context, _ = trainer.encode_text([prompt])
            with attn2_processor(tiny.unet, LayerwiseContext()):
                theirs = tiny.unet(x, t, context=context)
        with concepts.applied([(concept, 1.0, 1.0)], tiny.unet, tiny.text_encoder):
            bound = binding.PromptBinder(tiny, [concept]).encode([prompt])
            with attn2_processor(tiny.unet, LayerwiseContext()):
                ours = tiny.unet(x, t, context=bound)
        plain = tiny.unet(x, t, context=binding.encode_prompts(tiny, ["a photo of a ball on a table"]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the concept does something


def test_two_trained_concepts_fuse(run, tiny, tmp_path):
    """Gradient fusion takes the trainer's files: a second concept (squares) trained the same way,
    fused with the discs, keeps the two closer to their own outputs than weight averaging does."""
    folder = tmp_path / "squares"
    folder.mkdir()
    for k in range(3):
        img = Image.new("RGB", (64, 64), (230, 230 - 60 * k, 60))
        ImageDraw.Draw(img).rectangle((12 + 6 * k, 12, 44 + 6 * k, 44), fill=(20, 20, 160))
        img.save(folder / f"square{k}.png")
    square = dataclasses.replace(BASE, tokens=("<sq1>", "<sq2>"), class_word="box", steps=30)
    other = train(tiny, square, read_training_folder(folder, class_word="box"), tmp_path / "sq.safetensors",
                  encoder=vae.PreviewEncoder())
    settings = fusion.FusionSettings(spatial_steps=2, spatial_size=64, seed=0)
    result = fusion.fuse(tiny, [fusion.FusionInput(read_concept(run["out"])), fusion.FusionInput(other)], settings)
    assert {r["concept"] for r in result.report} == {"disc", "sq"}
    for stage in ("te", "kv", "spatial"):  # on the tiny model the solve is underdetermined (6 rows in a
        rows = [r for r in result.report if r["stage"] == stage]  # 32-wide layer): judged over both
        assert sum(r["fused"] for r in rows) < sum(r["average"] for r in rows), rows


def test_masked_loss_counts_only_the_mask():
    pred, noise = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    pred[:, :, :, :2] = 1.0  # wrong on the left half only
    left = torch.zeros(2, 1, 4, 4)
    left[..., :2] = 1
    assert training.masked_eps_loss(pred, noise, left) == pytest.approx(4.0)  # 4 channels, averaged on the mask
    assert training.masked_eps_loss(pred, noise, left.flip(-1)) == 0
    assert training.masked_eps_loss(pred, noise, torch.ones(2, 1, 4, 4)) == pytest.approx(2.0)


def test_the_loss_area_is_the_subject_mask_or_the_pasted_image(tiny, images):
    def area(masked: bool) -> torch.Tensor:
        s = dataclasses.replace(BASE, masked_loss=masked, crop_p=0.0)
        trainer = training.ConceptTrainer(tiny, s, images, encoder=vae.PreviewEncoder())
        trainer.prepare()
        return trainer.views.area

    subject, whole = area(True), area(False)
    assert torch.equal(whole, torch.ones_like(whole))  # 64 px pictures fill the 64 px canvas
    assert 0.15 < subject.mean() < 0.5
    assert subject[:, :, 4, 0].max() == 0  # the discs never reach the left edge ...
    assert subject[:, :, 4, 3].min() > 0.5  # ... and always cover x = 24..31 at mid height


def test_rows_stop_at_the_mean_norm(tiny, images):
    """With a high embedding learning rate the rows cross 0.55 within a few steps; from then on they
    are frozen (what the authors do), while the LoRA keeps learning."""
    s = dataclasses.replace(BASE, class_word=None, lr_embedding=0.05, steps=12)
    trainer = training.ConceptTrainer(tiny, s, images, encoder=vae.PreviewEncoder())
    norms, rows = [], []
    with trainer.installed():
        for _ in range(s.steps):
            norms.append(trainer.train_step()[1])
            rows.append(trainer.rows.detach().clone())
    crossed = next(i for i, n in enumerate(norms) if n >= 0.55)
    assert 0 < crossed < s.steps - 2, norms
    assert all(n < 0.55 for n in norms[:crossed])
    for later in rows[crossed + 1:]:
        assert torch.equal(later, rows[crossed])
    assert trainer.frozen_rows and not trainer.rows.requires_grad
    never = training.ConceptTrainer(tiny, dataclasses.replace(s, norm_stop=0.0), images, encoder=vae.PreviewEncoder())
    with never.installed():
        for _ in range(crossed + 2):
            never.train_step()
    assert not never.frozen_rows and float(never.rows.norm(dim=-1).mean()) > 0.55


def test_attention_regulariser_penalises_attention_outside_the_mask():
    inside = torch.zeros(1, 1, 4, 4)
    inside[..., :2] = 1  # subject on the left half
    on_left = torch.zeros(1, 16, 2)
    on_left.view(1, 4, 4, 2)[:, :, :2] = 1.0
    assert training.attention_regulariser([on_left], inside) == 0
    assert training.attention_regulariser([on_left], inside.flip(-1)) == pytest.approx(2.0)  # 2 tokens, all outside
    # two resolutions add up
    small = torch.zeros(1, 4, 2)
    small.view(1, 2, 2, 2)[:, :, 1] = 1.0
    assert training.attention_regulariser([on_left, small], inside) == pytest.approx(2.0)
    # layers of one resolution are averaged before the maximum scales them (0.25 / 0.75 outside, per
    # token; scaling each layer first would give (0 + 1) / 2)
    uniform = torch.full((1, 16, 2), 0.5)
    assert training.attention_regulariser([on_left, uniform], inside) == pytest.approx(2 / 3)


def test_attention_regulariser_enters_the_loss(tiny, images):
    def first_loss(weight: float) -> float:
        s = dataclasses.replace(BASE, attn_reg_weight=weight, steps=1)
        trainer = training.ConceptTrainer(tiny, s, images, encoder=vae.PreviewEncoder())
        with trainer.installed():
            return trainer.train_step()[0]

    plain, regularised = first_loss(0.0), first_loss(1.0)
    assert regularised > plain + 1e-3  # same seed, same batch: the difference is the regulariser


def test_gradient_checkpointing_gives_the_same_step(tiny, images):
    """Checkpointed UNet blocks are recomputed in backward (with the layer-wise context and the
    attention recorder still installed): the same parameters after two steps as without."""
    def after_two(checkpointing: bool) -> training.ConceptTrainer:
        s = dataclasses.replace(BASE, gradient_checkpointing=checkpointing, attn_reg_weight=0.01)
        trainer = training.ConceptTrainer(tiny, s, images, encoder=vae.PreviewEncoder())
        with trainer.installed():
            trainer.train_step()
            trainer.train_step()
        return trainer

    plain, checkpointed = after_two(False), after_two(True)
    torch.testing.assert_close(checkpointed.rows, plain.rows, rtol=1e-5, atol=1e-6)
    for name in plain.unet_lora.names:
        torch.testing.assert_close(checkpointed.unet_lora.up[name], plain.unet_lora.up[name], rtol=1e-4, atol=1e-6)
    assert not any("forward" in block.__dict__ for block in tiny.unet.input_blocks)  # unwrapped again


def test_resume_equals_one_run(tiny, images, tmp_path):
    s = dataclasses.replace(BASE, steps=8, save_every=4, attn_reg_weight=0.01)
    whole = train(tiny, s, images, tmp_path / "whole.safetensors", encoder=vae.PreviewEncoder())
    out = tmp_path / "split.safetensors"
    done = []
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny, s, images, out, encoder=vae.PreviewEncoder(), progress=lambda p: done.append(p.step),
              should_stop=lambda: len(done) == 4)
    assert stopped.value.step == 4 and stopped.value.checkpoint == out
    assert state_path(out).is_file() and read_concept(out).tokens == TOKENS  # the checkpoint at step 4
    with pytest.raises(TrainingError, match="already exists"):
        train(tiny, s, images, out, encoder=vae.PreviewEncoder())
    with pytest.raises(TrainingError, match="lr_unet"):
        train(tiny, dataclasses.replace(s, lr_unet=1e-3), images, out, encoder=vae.PreviewEncoder(), resume=True)
    split = train(tiny, s, images, out, encoder=vae.PreviewEncoder(), resume=True)
    assert not state_path(out).exists()  # done: the resume state goes
    torch.testing.assert_close(split.embeddings, whole.embeddings, rtol=1e-5, atol=1e-7)
    for name, f in whole.unet_lora.items():
        torch.testing.assert_close(split.unet_lora[name].up, f.up, rtol=1e-5, atol=1e-7)
    for name, f in whole.text_lora.items():
        torch.testing.assert_close(split.text_lora[name].down, f.down, rtol=1e-5, atol=1e-7)


def test_resume_refuses_other_data(tiny, images, tmp_path):
    s = dataclasses.replace(BASE, steps=4, save_every=2)
    out = tmp_path / "c.safetensors"
    with pytest.raises(TrainingInterrupted):
        train(tiny, s, images, out, encoder=vae.PreviewEncoder(), should_stop=lambda: state_path(out).exists())
    with pytest.raises(TrainingError, match="training images changed"):
        train(tiny, s, images[:-1], out, encoder=vae.PreviewEncoder(), resume=True)
    with pytest.raises(TrainingError, match="no resume state"):
        train(tiny, s, images, tmp_path / "other.safetensors", encoder=vae.PreviewEncoder(), resume=True)


def test_interrupt_before_any_checkpoint_writes_nothing(tiny, images, tmp_path):
    out = tmp_path / "c.safetensors"
    steps = []
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny, dataclasses.replace(BASE, steps=6), images, out, encoder=vae.PreviewEncoder(),
              progress=lambda p: steps.append(p.step), should_stop=lambda: len(steps) == 2)
    assert stopped.value.step == 2 and stopped.value.checkpoint is None
    assert list(tmp_path.iterdir()) == []


def test_kohya_style_lora_with_trigger_words(tiny, images, tmp_path):
    s = dataclasses.replace(BASE, kind="lora", tokens=(), trigger="rdball", steps=3, lr_text=0.0)
    concept = train(tiny, s, images, tmp_path / "rdball.safetensors", encoder=vae.PreviewEncoder())
    assert concept.tokens == () and concept.triggers == ("rdball",)
    assert len(concept.unet_lora) == 128 and concept.text_lora == {}
    assert any(f.up.abs().max() > 0 for f in concept.unet_lora.values())


def test_previews_and_checkpoints_are_reported(tiny, images, tmp_path):
    s = dataclasses.replace(BASE, steps=4, save_every=2, sample_every=2, sample_prompts=("a photo of <TOK>",),
                            sample_steps=2)
    samples, checkpoints = [], []
    train(tiny, s, images, tmp_path / "c.safetensors", encoder=vae.PreviewEncoder(),
          on_samples=lambda step, pics: samples.append((step, pics)),
          on_checkpoint=lambda step, path: checkpoints.append(step))
    assert [step for step, _ in samples] == [2, 4] and samples[0][1][0].size == (64, 64)
    assert checkpoints == [2]  # the final write is the result, not a checkpoint


@pytest.mark.parametrize("field, value, match", [
    ("tokens", ("disc",), "angle brackets"),
    ("tokens", ("<a>", "<a>"), "must differ"),
    ("resolution", 100, "multiple of 64"),
    ("steps", 0, "positive integer"),
    ("lr_unet", float("nan"), "finite"),
    ("crop_p", 1.5, "probability"),
    ("templates", "people", "one of"),
    ("precision", "fp8", "one of"),
])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(TrainingError, match=f"'{field}'.*{match}"):
        dataclasses.replace(BASE, **{field: value})


def test_lora_kind_needs_trigger_words():
    with pytest.raises(TrainingError, match="'trigger'"):
        dataclasses.replace(BASE, kind="lora", tokens=())


def test_settings_round_trip_through_json():
    s = dataclasses.replace(BASE, sample_prompts=("a <TOK>",))
    assert TrainSettings.from_json(s.to_json()) == s
