"""Concept tokens in every generation inside the host double, as users meet them: with or without
the Mix-of-Show script, in the prompt and the negative, with prompt editing, in the infotext;
unknown tokens, unreadable files and authors' files in the Lora folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lib_mos.concepts import binding, synthetic
from lib_mos.concepts.concept import ConceptError
from lib_mos.concepts.files import write_concept
from lib_mos.models import sampling, sd1
from lib_mos.models.family import attn2_modules

WITH_EXTENSION = True  # the `host` fixture installs this extension


@pytest.fixture
def model(tiny_checkpoint) -> sd1.SD1Model:
    return sd1.load_checkpoint(tiny_checkpoint)


@pytest.fixture
def cat(host, model):
    """A concept file `cat.safetensors` in the Lora folder defining <cat1> <cat2>."""
    from modules import shared

    concept = synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4, name="cat")
    path = write_concept(concept, Path(shared.cmd_opts.lora_dir) / "cat.safetensors")
    return concept, path


def addnet_hash(path: Path) -> str:
    """What the WebUI's Lora shows in "Lora hashes" for a .safetensors file: sha256 of the bytes
    after the header (modules/hashes.py addnet_hash_safetensors)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def latents(res) -> torch.Tensor:
    return torch.stack([im.latent for im in res.images])


def no_hooks(host) -> bool:
    return all("forward" not in m.__dict__ for _, m in attn2_modules(host.model.model.diffusion_model))


def reference(model, concepts, prompt: str, negative: str, *, seed: int, steps: int, size: int = 64) -> torch.Tensor:
    """The same generation outside the host: `lib_mos.concepts.binding` and the project's Euler sampler."""
    binder = binding.PromptBinder(model, concepts)
    return sampling.sample_euler(model, binder.encode([prompt]), binder.encode([negative]), seeds=[seed],
                                 height=size, width=size, steps=steps, cfg_scale=7.0)


def test_tokens_bind_without_the_script(host, model, cat):
    """No script selected: the always-on part binds the prompt's and the negative's tokens."""
    concept, _ = cat
    prompt, negative = "a photo of <cat1> <cat2>", "blurry <cat2>"
    res = host.txt2img(prompt, negative, steps=3, seed=9)
    torch.testing.assert_close(latents(res), reference(model, [concept], prompt, negative, seed=9, steps=3),
                               rtol=2e-3, atol=2e-3)
    assert no_hooks(host)


def test_negative_prompt_tokens_bind(host, model, cat):
    """A wrong version that encodes the negative as text differs from the bound reference."""
    concept, _ = cat
    res = host.txt2img("a photo of a cat", "<cat1> <cat2>", steps=3, seed=2,
                       script_args=host.script_args("Mix-of-Show", ""))
    ours = reference(model, [concept], "a photo of a cat", "<cat1> <cat2>", seed=2, steps=3)
    torch.testing.assert_close(latents(res), ours, rtol=2e-3, atol=2e-3)
    as_text = reference(model, [], "a photo of a cat", "blurry", seed=2, steps=3)  # a different negative
    assert not torch.allclose(latents(res), as_text, atol=1e-3)


def test_script_and_always_on_agree_and_bind_once(host, cat):
    from modules import infotext_utils

    _, path = cat
    with_script = host.txt2img("a photo of <cat1> <cat2>", steps=2, seed=3,
                               script_args=host.script_args("Mix-of-Show", ""))
    without = host.txt2img("a photo of <cat1> <cat2>", steps=2, seed=3)
    assert torch.equal(latents(with_script), latents(without))
    for res in (with_script, without):
        params = infotext_utils.parse_generation_parameters(res.info)
        assert params["Mix-of-Show concepts"] == f"<cat1> <cat2> from cat.safetensors@{addnet_hash(path)[:12]}"
    assert no_hooks(host)


def test_prompt_editing_with_concept_tokens_is_scheduled(host, model, cat, monkeypatch):
    """`[a:b:n]` around concept tokens switches texts at the host's step, and each text binds."""
    concept, _ = cat
    seen = []
    from lib_mos.regional import attention

    original = attention.SteppedRegionalContext.set_step

    def spy(self, region_context, weights, context=None, *rest):
        seen.append(None if context is None else context[0].clone())
        return original(self, region_context, weights, context, *rest)

    monkeypatch.setattr(attention.SteppedRegionalContext, "set_step", spy)
    res = host.txt2img("[a photo of <cat1>:a painting of <cat2>:2]", steps=4, seed=1)
    assert res.images and len(seen) == 4
    binder = binding.PromptBinder(model, [concept])
    first, second = binder.encode(["a photo of <cat1>", "a painting of <cat2>"])
    for step, ctx in enumerate(seen):
        want = first if step <= 2 else second
        torch.testing.assert_close(ctx[:, :77], want, rtol=1e-4, atol=1e-4)


def test_unknown_token_without_the_script_stays_text_with_a_warning(host, cat, capsys):
    res = host.txt2img("a photo of <wildcard> and <cat1>", steps=2, seed=4)
    assert res.images and no_hooks(host)
    err = capsys.readouterr().err
    assert "<wildcard>" in err and "left in the prompt as text" in err and "<cat1>, <cat2>" in err


def test_unknown_token_with_the_script_is_an_error_listing_what_exists(host, cat):
    with pytest.raises(ConceptError) as exc:
        host.txt2img("a photo of <dog1>", steps=1, script_args=host.script_args("Mix-of-Show", ""))
    assert "<dog1>" in str(exc.value) and "available: <cat1>, <cat2>" in str(exc.value)
    assert no_hooks(host)


def test_unreadable_and_authors_files_are_named(host, model, cat, capsys):
    from modules import shared

    lora = Path(shared.cmd_opts.lora_dir)
    (lora / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    potter = synthetic.random_concept(model, ("<potter1>", "<potter2>"), seed=6)
    synthetic.save_torch_file(synthetic.authors_params(potter), lora / "potter.pth")
    with pytest.raises(ConceptError) as exc:
        host.txt2img("<potter1> and <nobody>", steps=1, script_args=host.script_args("Mix-of-Show", ""))
    message = str(exc.value)
    assert "broken.safetensors" in message and "potter.pth" in message and "convert" in message
    res = host.txt2img("<potter1> <potter2>", steps=1)  # without the script: warnings, text
    assert res.images
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "potter.pth" in err


def test_always_on_failure_fails_the_generation_and_unhooks(host, cat):
    """The host only logs errors of `process`; a concept that cannot be bound must not silently
    turn into text, and the hooks go away with the request."""
    import safetensors.torch

    from modules import shared

    # a file whose header says it defines <cat1> <cat2> but whose tensors are missing; it sorts
    # before cat.safetensors, so it is the one chosen, and reading it fails
    meta = {"mos_concept": json.dumps({"format": "mos-concept", "version": 1, "tokens": ["<cat1>", "<cat2>"]})}
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(Path(shared.cmd_opts.lora_dir) / "a-cat.safetensors"),
                                metadata=meta)
    with pytest.raises(ConceptError, match=r"a-cat\.safetensors"):
        host.txt2img("a photo of <cat1> <cat2>", steps=2, seed=1)
    assert no_hooks(host)


def test_regions_json_of_the_dropdown_keeps_binding_tokens(host, cat):
    spec = json.dumps({"regions": [{"prompt": "<cat1> <cat2> sitting", "box": [0, 0, 1, 0.5], "units": "fraction"}]})
    res = host.txt2img("a garden", "<cat2>", steps=2, seed=2, script_args=host.script_args("Mix-of-Show", spec))
    assert res.images and no_hooks(host)
