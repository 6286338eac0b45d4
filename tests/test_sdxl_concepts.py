"""ED-LoRA concepts on SDXL: one embedding row per cross-attention layer for both text encoders
(CLIP-L's part first, bigG's after), the pooled vector as the mean over the layer copies, the
concept file carrying its family, and a concept of the other family refused by name."""

from __future__ import annotations

import pytest
import torch

from lib_mos.concepts import binding, files
from lib_mos.concepts.concept import ConceptError, applied, check_fits
from lib_mos.concepts.synthetic import random_concept
from lib_mos.models import sampling, sd1, sdxl
from lib_mos.models.family import SD1, SDXL

WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module")
def xl() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def concept(xl):
    return random_concept(xl, ("<dog1>", "<dog2>"), seed=3, name="dog")


def reference(model: sdxl.SDXLModel, prompt_with_placeholder: str, rows: list[torch.Tensor],
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [77, D], pooled [P]) of a prompt whose 'xx' words get `rows` by hand: each encoder's
    input embedding overwritten there by a forward hook, CLIP-L with the first 32 numbers of a row
    (its width in the tiny model), bigG with the other 48."""
    ids = binding.tokenize(model, [prompt_with_placeholder])
    xx = model.tokenizer("xx", add_special_tokens=False)["input_ids"]
    positions = (ids[0] == xx[0]).nonzero().flatten().tolist()
    assert len(positions) == len(rows)
    te1, te2 = model.text_encoders
    handles = []
    for encoder, part in ((te1, slice(0, 32)), (te2, slice(32, 80))):
        assert encoder.get_input_embeddings().embedding_dim == part.stop - part.start

        def hook(module, inputs, out, part=part):
            out = out.clone()
            for pos, row in zip(positions, rows):
                out[0, pos] = row[part]
            return out

        handles.append(encoder.get_input_embeddings().register_forward_hook(hook))
    try:
        context, pooled = model.encode_text(ids)
    finally:
        for h in handles:
            h.remove()
    return context[0], pooled[0]


def test_each_layer_is_encoded_with_its_own_rows_through_both_encoders(xl, concept):
    binder = binding.PromptBinder(xl, [concept])
    prompt = "a <dog1> <dog2> on a red mat"
    z = binder.encode([prompt])
    assert z.shape == (1, SDXL.layers, 77, 80)
    pooled = []
    for layer in range(SDXL.layers):
        rows = [concept.embeddings[0, layer], concept.embeddings[1, layer]]
        want, p = reference(xl, "a xx xx on a red mat", rows)
        torch.testing.assert_close(z[0, layer], want, rtol=1e-5, atol=1e-5)
        pooled.append(p)
    # the UNet's one pooled text: the mean over the 70 layer copies
    torch.testing.assert_close(binder.pooled([prompt])[0], torch.stack(pooled).mean(0), rtol=1e-5, atol=1e-5)
    # layers differ, so a layer order or an encoder split mixed up cannot pass the loop above
    assert not torch.allclose(z[0, 0], z[0, -1])


def test_conditioning_is_the_layerwise_context_and_the_vector_at_the_picture_size(xl, concept):
    binder = binding.PromptBinder(xl, [concept])
    prompts = ["a <dog1> <dog2>", "a red mat"]
    cond = binder.conditioning(prompts, WIDTH, HEIGHT)
    assert torch.equal(cond["crossattn"], binder.encode(prompts))
    plain = xl.encode_ids(binding.tokenize(xl, ["a red mat"]), WIDTH, HEIGHT)
    torch.testing.assert_close(cond["vector"][1], plain["vector"][0])
    torch.testing.assert_close(cond["crossattn"][1, 5], plain["crossattn"][0])
    # the size part is the picture's, the pooled part the bound prompt's
    torch.testing.assert_close(cond["vector"][0], xl.vector(binder.pooled(prompts[:1]), WIDTH, HEIGHT)[0])
    assert not torch.allclose(cond["vector"][0], xl.vector(binder.pooled(prompts[:1]), 1024, 1024)[0])


def test_rows_equal_at_every_layer_are_textual_inversion_in_the_unet(xl):
    """A concept whose rows repeat at every layer draws exactly as the same vectors written into
    both encoders' embedding tables (what the host does for an SDXL embedding), so the layer-wise
    context reaches each of SDXL's 70 attn2 layers and the vector is the prompt's own."""
    one = random_concept(xl, ("<cat1>",), seed=5, name="cat")
    one.embeddings = one.embeddings[:, :1].expand(-1, SDXL.layers, -1).contiguous()
    binder = binding.PromptBinder(xl, [one])
    cond = binder.conditioning(["a <cat1> sitting"], WIDTH, HEIGHT)
    ids = binding.tokenize(xl, ["a xx sitting"])
    xx = xl.tokenizer("xx", add_special_tokens=False)["input_ids"][0]
    te1, te2 = xl.text_encoders
    saved = [te.get_input_embeddings().weight[xx].clone() for te in (te1, te2)]
    try:
        with torch.no_grad():
            te1.get_input_embeddings().weight[xx] = one.embeddings[0, 0, :32]
            te2.get_input_embeddings().weight[xx] = one.embeddings[0, 0, 32:]
        want = xl.encode_ids(ids, WIDTH, HEIGHT)
    finally:
        with torch.no_grad():
            for te, row in zip((te1, te2), saved):
                te.get_input_embeddings().weight[xx] = row
    x = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(3.0)
    with sampling.any_multiple_of_8():
        plain = sampling.Denoiser(xl, want["crossattn"], None, 1.0, vector=want["vector"])
        layered = sampling.Denoiser(xl, cond["crossattn"], None, 1.0, vector=cond["vector"])
        with plain.attention(None):
            a = plain(x, sigma)
        with layered.attention(None):
            b = layered(x, sigma)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_a_different_row_at_one_layer_changes_only_what_that_layer_attends_to(xl, concept):
    """Layer l's attn2 reads the context of layer l: a concept whose rows differ at one layer gives
    a different UNet prediction than rows equal everywhere (the layer-wise context is not collapsed)."""
    equal = random_concept(xl, ("<cat1>",), seed=5, name="cat")
    equal.embeddings = equal.embeddings[:, :1].expand(-1, SDXL.layers, -1).contiguous()
    one_off = random_concept(xl, ("<cat1>",), seed=5, name="cat")
    one_off.embeddings = equal.embeddings.clone()
    one_off.embeddings[0, 37] = concept.embeddings[0, 37]
    x = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for c in (equal, one_off):
        cond = binding.PromptBinder(xl, [c]).conditioning(["a <cat1>"], WIDTH, HEIGHT)
        step = sampling.Denoiser(xl, cond["crossattn"], None, 1.0, vector=cond["vector"])
        with sampling.any_multiple_of_8(), step.attention(None):
            outs.append(step(x, torch.tensor(3.0)))
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)


def test_sdxl_concept_file_round_trip_names_its_family(xl, concept, tmp_path):
    path = files.write_concept(concept, tmp_path / "dog.safetensors")
    assert files.family_of_file(path) is SDXL
    back = files.read_concept(path, family=SDXL)
    assert back.family is SDXL and back.tokens == concept.tokens
    assert torch.equal(back.embeddings, concept.embeddings)
    assert back.unet_lora.keys() == concept.unet_lora.keys() and back.text_lora.keys() == concept.text_lora.keys()
    assert any(n.startswith("1.") for n in back.text_lora)  # bigG's layers too
    files.check_against_model(back, xl)
    with applied([(back, 1.0, 1.0)], xl.unet, xl.text_root):
        changed = binding.PromptBinder(xl, [back]).encode(["a <dog1>"])
    assert not torch.allclose(changed, binding.PromptBinder(xl, [back]).encode(["a <dog1>"]))
    with pytest.raises(ConceptError, match=r"dog\.safetensors.*for SDXL; this is an SD1\.x model"):
        files.read_concept(path)


def test_a_concept_of_the_other_family_is_refused_by_name(xl, concept, tmp_path):
    sd = sd1.build_tiny_sd1(0)
    sd_concept = random_concept(sd, ("<cat1>",), seed=1, name="kitty")
    with pytest.raises(ConceptError, match=r"concept 'kitty' is for SD1\.x; this is an SDXL model"):
        binding.PromptBinder(xl, [sd_concept])
    with pytest.raises(ConceptError, match=r"concept 'dog' is for SDXL; this is an SD1\.x model"):
        binding.PromptBinder(None, [concept], SD1)
    narrow = random_concept(xl, ("<cat1>",), seed=1, name="narrow")
    narrow.embeddings = narrow.embeddings[..., :32]  # CLIP-L's part only
    with pytest.raises(ConceptError, match="'narrow' has embedding rows of width 32; this model's text encoders take 80"):
        binding.PromptBinder(xl, [narrow])
    with pytest.raises(ConceptError, match="embeddings are 32 wide but the model's text encoder is 80"):
        check_fits(narrow, xl.unet, xl.text_root)
