"""Layer-wise prompt binding, per-instance attention processors and LoRA apply/remove."""

from __future__ import annotations

import re

import pytest
import torch

from lib_mos.concepts import binding
from lib_mos.concepts.concept import Concept, ConceptError, LoraFactor, applied, check_fits
from lib_mos.concepts.synthetic import random_concept
from lib_mos.models import sampling, sd1
from lib_mos.models.attention import LayerwiseContext, attn2_processor
from lib_mos.models.family import attn2_modules


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


def make_concept(model: sd1.SD1Model, tokens=("<cat1>", "<cat2>"), seed: int = 1, rank: int = 4) -> Concept:
    return random_concept(model, tuple(tokens), seed=seed, rank=rank, name="cat")


def injected_encoding(model, prompt_with_placeholder: str, rows: list[torch.Tensor]) -> torch.Tensor:
    """Reference: tokenize with the placeholder word 'xx' at each concept position, then overwrite
    those input-embedding rows by hand (a forward hook) and encode."""
    ids = binding.tokenize(model, [prompt_with_placeholder])
    xx = model.tokenizer("xx", add_special_tokens=False)["input_ids"]
    assert len(xx) == 1
    positions = (ids[0] == xx[0]).nonzero().flatten().tolist()
    assert len(positions) == len(rows)
    emb = model.text_encoder.get_input_embeddings()

    def hook(module, inputs, out):
        out = out.clone()
        for pos, row in zip(positions, rows):
            out[0, pos] = row
        return out

    handle = emb.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.text_encoder(input_ids=ids).last_hidden_state[0]
    finally:
        handle.remove()


def test_prompt_without_concept_tokens_is_the_plain_encoding(tiny):
    concept = make_concept(tiny)
    binder = binding.PromptBinder(tiny, [concept])
    z = binder.encode(["a photo of a dog"])
    plain = binding.encode_prompts(tiny, ["a photo of a dog"])
    assert z.shape == (1, 16, 77, 32)
    for layer in range(16):
        assert torch.equal(z[0, layer], plain[0])


def test_layer_l_equals_encoding_with_layer_l_rows(tiny):
    concept = make_concept(tiny)
    z = binding.bind_prompts(tiny, ["a photo of <cat1> <cat2> on a sofa"], [concept])[0]
    for layer in (0, 7, 15):
        ref = injected_encoding(tiny, "a photo of xx xx on a sofa",
                                [concept.token_rows("<cat1>")[layer], concept.token_rows("<cat2>")[layer]])
        torch.testing.assert_close(z[layer], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z[0], z[15])
    torch.testing.assert_close(z[0, :4], z[15, :4])  # causal: positions before the first concept token agree


def test_binding_batches_and_caches(tiny):
    concept = make_concept(tiny)
    binder = binding.PromptBinder(tiny, [concept])
    prompts = ["<cat1> <cat2>", "a dog", "<cat1> <cat2>", "a <cat2> and a <cat1>"]
    z = binder.encode(prompts)
    assert z.shape == (4, 16, 77, 32)
    assert torch.equal(z[0], z[2])
    single = binding.bind_prompts(tiny, ["a <cat2> and a <cat1>"], [concept])[0]
    torch.testing.assert_close(z[3], single, rtol=1e-5, atol=1e-5)
    calls = []
    hook = tiny.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = binder.encode(["a dog", "<cat1> <cat2>"])  # both seen before: served from the cache
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(again[0], z[1]) and torch.equal(again[1], z[0])


def test_longest_token_wins(tiny):
    a = make_concept(tiny, tokens=("<dog>",), seed=2)
    b = make_concept(tiny, tokens=("<dog2>",), seed=3)
    binder = binding.PromptBinder(tiny, [a, b])
    assert binder.concept_tokens_in("a <dog2> and <dog>") == ["<dog2>", "<dog>"]


def test_duplicate_tokens_are_refused(tiny):
    with pytest.raises(ConceptError, match="<cat1>"):
        binding.PromptBinder(tiny, [make_concept(tiny), make_concept(tiny, seed=5)])


def test_layerwise_context_processor_matches_plain_unet_and_is_removed(tiny):
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 300])
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = tiny.unet(x, t, context=ctx)
        with attn2_processor(tiny.unet, LayerwiseContext()):
            same = tiny.unet(x, t, context=ctx.unsqueeze(1).expand(-1, 16, -1, -1))
        torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
        assert all("forward" not in m.__dict__ for _, m in attn2_modules(tiny.unet))
        with pytest.raises(RuntimeError):  # a layer-wise context without processors fails loudly
            tiny.unet(x, t, context=ctx.unsqueeze(1).expand(-1, 16, -1, -1))


def test_processor_removed_after_error(tiny):
    def broken(module, layer, x, context):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attn2_processor(tiny.unet, broken), torch.no_grad():
        tiny.unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 77, 32))
    assert all("forward" not in m.__dict__ for _, m in attn2_modules(tiny.unet))


def test_sampling_with_a_bound_concept(tiny):
    concept = make_concept(tiny)
    binder = binding.PromptBinder(tiny, [concept])
    cond = binder.encode(["a photo of <cat1> <cat2>"])
    uncond = binding.encode_prompts(tiny, [""])
    a = sampling.sample_euler(tiny, cond, uncond, seeds=[0], height=64, width=64, steps=3)
    b = sampling.sample_euler(tiny, binder.encode(["a photo of a cat"]), uncond, seeds=[0], height=64, width=64,
                              steps=3)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in {**model.unet.state_dict(), **{
        f"te.{k}": v for k, v in model.text_root.state_dict().items()}}.items()}


def test_apply_changes_outputs_and_removal_is_bit_exact(tiny):
    concept = make_concept(tiny)
    before = snapshot(tiny)
    ids = binding.tokenize(tiny, ["a cat"])
    with torch.no_grad():
        z0 = tiny.text_encoder(input_ids=ids).last_hidden_state
        with applied([(concept, 0.5, 0.7)], tiny.unet, tiny.text_encoder):
            z1 = tiny.text_encoder(input_ids=ids).last_hidden_state
            # each weight scales its own half of the concept
            name = sd1.unet_attention_linear_names()[0]
            torch.testing.assert_close(tiny.unet.get_submodule(name).weight,
                                       before[f"{name}.weight"] + 0.5 * concept.unet_lora[name].delta())
            name = sd1.text_attention_linear_names()[0]
            torch.testing.assert_close(tiny.text_encoder.get_submodule(name).weight,
                                       before[f"te.{name}.weight"] + 0.7 * concept.text_lora[name].delta())
    assert not torch.allclose(z0, z1)
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_removal_is_bit_exact_after_an_error(tiny):
    before = snapshot(tiny)
    with pytest.raises(KeyboardInterrupt), applied([(make_concept(tiny), 1.0, 1.0),
                                                    (make_concept(tiny, ("<x>",), 9), 0.5, 0.5)],
                                                   tiny.unet, tiny.text_encoder):
        raise KeyboardInterrupt
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_concept_of_another_family_is_refused(tiny):
    concept = make_concept(tiny)
    wrong = Concept(name="xl", tokens=concept.tokens, embeddings=torch.zeros(2, 16, 2048),
                    source_path="/x/xl-concept.safetensors")
    with pytest.raises(ConceptError, match=r"xl-concept\.safetensors.*2048"):
        check_fits(wrong, tiny.unet, tiny.text_encoder)
    name = sd1.unet_attention_linear_names()[5]
    bad = Concept(name="bad", tokens=concept.tokens, embeddings=concept.embeddings,
                  unet_lora={name: LoraFactor(torch.zeros(4, 999), torch.zeros(32, 4))}, source_path="bad.pth")
    with pytest.raises(ConceptError, match=rf"bad\.pth.*{re.escape(name)}"):
        check_fits(bad, tiny.unet, tiny.text_encoder)
    before = snapshot(tiny)
    with pytest.raises(ConceptError), applied([(concept, 1.0, 1.0), (bad, 1.0, 1.0)], tiny.unet, tiny.text_encoder):
        pass
    assert all(torch.equal(before[k], v) for k, v in snapshot(tiny).items())


def test_name_mapping_resolves_every_target(tiny):
    from lib_mos.concepts.concept import unet_diffusers_to_ldm, unet_ldm_to_diffusers

    names = sd1.unet_attention_linear_names()
    diffusers = [unet_ldm_to_diffusers(n) for n in names]
    assert len(set(diffusers)) == 128 and all(d.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")
                                              for d in diffusers)
    assert [unet_diffusers_to_ldm(d) for d in diffusers] == names
    assert unet_diffusers_to_ldm("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
    assert unet_diffusers_to_ldm("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_k") == \
        "input_blocks.8.1.transformer_blocks.0.attn1.to_k"
    skeleton = sd1.build_sd15_skeleton()
    for n in names:
        skeleton.unet.get_submodule(n)
    for n in sd1.text_attention_linear_names():
        skeleton.text_encoder.get_submodule(n)
    with pytest.raises(KeyError):
        unet_diffusers_to_ldm("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
