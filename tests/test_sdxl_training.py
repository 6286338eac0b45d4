"""The ED-LoRA trainer on the tiny SDXL model: 70 rows per token as wide as CLIP-L and bigG
together (the class word's row is both tables' rows), LoRA on both encoders and the 560 UNet
attention linears, the UNet called with the pooled text and size vector; the written concept binds
exactly as it trained, the model is untouched, and gradient checkpointing gives the same step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_training import BASE, write_discs

from lib_mos.concepts import binding
from lib_mos.concepts import concept as concepts
from lib_mos.concepts.files import read_concept
from lib_mos.models import sdxl, vae
from lib_mos.models.attention import LayerwiseContext, attn2_processor
from lib_mos.models.family import SDXL
from lib_mos.training import trainer as training
from lib_mos.training.data import read_training_folder
from lib_mos.training.trainer import train

SETTINGS = dataclasses.replace(BASE, steps=12)


@pytest.fixture(scope="module")
def xl() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return read_training_folder(write_discs(tmp_path_factory.mktemp("discs")), class_word="ball")


@pytest.fixture(scope="module")
def run(xl, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "disc.safetensors"
    before = {n: p.detach().clone() for n, p in [*xl.unet.named_parameters(), *xl.text_root.named_parameters()]}
    seen, losses = {}, []
    real_step = training.ConceptTrainer.train_step

    def spy(self):
        seen["trainer"] = self
        loss, norm = real_step(self)
        losses.append(loss)
        return loss, norm

    training.ConceptTrainer.train_step = spy
    try:
        concept = train(xl, SETTINGS, images, out, encoder=vae.PreviewEncoder())
    finally:
        training.ConceptTrainer.train_step = real_step
    return {"out": out, "concept": concept, "trainer": seen["trainer"], "before": before, "losses": losses}


def test_rows_start_from_both_encoders_tables_and_learn(run, xl):
    concept = run["concept"]
    assert concept.family is SDXL and concept.embeddings.shape == (2, SDXL.layers, 80)
    assert len(concept.unet_lora) == 560 and len(concept.text_lora) == 16
    assert {n[:2] for n in concept.text_lora} == {"0.", "1."}
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    ball = xl.tokenizer("ball", add_special_tokens=False)["input_ids"][0]
    te1, te2 = xl.text_encoders
    start = torch.cat([te1.get_input_embeddings().weight[ball], te2.get_input_embeddings().weight[ball]])
    trainer = training.ConceptTrainer(xl, SETTINGS, run["trainer"].images, encoder=vae.PreviewEncoder())
    assert torch.equal(trainer.rows.detach()[1], start.expand(SDXL.layers, -1))
    moved = (concept.embeddings[1] - start).norm(dim=-1)
    assert moved.min() > 1e-4  # every one of the 70 layers' rows learned


def test_the_model_is_untouched(run, xl):
    for name, p in [*xl.unet.named_parameters(), *xl.text_root.named_parameters()]:
        assert torch.equal(p.detach(), run["before"][name]), name
        assert p.requires_grad
    assert not any(m._forward_hooks for m in [*xl.unet.modules(), *xl.text_root.modules()])


def test_the_sdxl_file_binds_exactly_as_it_trained(run, xl):
    """The written concept, read for SDXL, applied and bound the product's way (layer-wise context
    and the pooled vector at the training size) reproduces the trainer's own prediction."""
    concept = read_concept(run["out"], family=SDXL)
    trainer = run["trainer"]
    prompt = "a photo of <disc1> <disc2> on a table"
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    size = SETTINGS.resolution
    with torch.no_grad():
        with trainer.installed():
            cond, _ = trainer.encode_text([prompt])
            with attn2_processor(xl.unet, LayerwiseContext()):
                theirs = trainer.predict(x, t, cond)
        with concepts.applied([(concept, 1.0, 1.0)], xl.unet, xl.text_root):
            bound = binding.PromptBinder(xl, [concept]).conditioning([prompt], size, size)
            with attn2_processor(xl.unet, LayerwiseContext()):
                ours = xl.unet(x, t, context=bound["crossattn"], y=bound["vector"])
        plain = xl.encode_ids(binding.tokenize(xl, ["a photo of a ball on a table"]), size, size)
        with attn2_processor(xl.unet, LayerwiseContext()):
            base = xl.unet(x, t, context=plain["crossattn"], y=plain["vector"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the concept does something


def test_gradient_checkpointing_gives_the_same_step_on_sdxl(xl, images):
    steps = []
    for checkpointing in (False, True):
        settings = dataclasses.replace(SETTINGS, steps=2, gradient_checkpointing=checkpointing)
        trainer = training.ConceptTrainer(xl, settings, images, encoder=vae.PreviewEncoder())
        with trainer.installed():
            loss, _ = trainer.train_step()
        steps.append((loss, trainer.concept()))
    (a, ca), (b, cb) = steps
    assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(ca.embeddings, cb.embeddings, rtol=1e-5, atol=1e-6)
    name = next(iter(ca.unet_lora))
    torch.testing.assert_close(ca.unet_lora[name].up, cb.unet_lora[name].up, rtol=1e-4, atol=1e-7)


def test_checkpointing_keeps_the_text_encoders_activations_out(xl, images):
    """A caption with concept tokens goes through both encoders 70 times: with gradient
    checkpointing their layers keep only their inputs for the backward pass (full size: 19 GB of
    activations per caption in fp32 without it)."""
    saved = []
    for checkpointing in (False, True):
        trainer = training.ConceptTrainer(xl, dataclasses.replace(SETTINGS, gradient_checkpointing=checkpointing),
                                          images, encoder=vae.PreviewEncoder())
        sizes: list[int] = []

        def pack(t: torch.Tensor, _sizes=sizes) -> torch.Tensor:
            _sizes.append(t.numel())
            return t

        with trainer.installed(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.encode_text(["a photo of <disc1> <disc2>"])
        saved.append(sum(sizes))
    assert saved[1] < saved[0] / 4, saved
