"""Binding inside the host double through the host's own prompt encoder equals lib_mos's binding,
and keeps the host's chunking, emphasis and BREAK."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lib_mos.concepts import binding
from lib_mos.models import sd1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import mos_host_binding
from test_binding import make_concept


def test_host_binding_equals_lib_binding(host):
    from modules.sd_hijack import model_hijack

    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    concept = make_concept(model)
    binder = binding.PromptBinder(model, [concept])
    prompts = ["a photo of <cat1> <cat2> on a sofa", "a dog"]
    ours = binder.encode(prompts)
    theirs = mos_host_binding.encode_bound(host.model, binder, prompts)
    assert theirs.shape == (2, 16, 77, 32)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert not model_hijack.embedding_db.word_embeddings  # temporary embeddings are gone


def test_host_binding_keeps_chunks_emphasis_and_break(host):

    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    binder = binding.PromptBinder(model, [make_concept(model)])
    z = mos_host_binding.encode_bound(host.model, binder,
                                      ["a (photo:1.3) of <cat1> <cat2> BREAK on a sofa"])
    assert z.shape == (1, 16, 154, 32)
    assert not torch.allclose(z[0, 0], z[0, 15])


def test_aliases_are_single_words_the_tokenizer_keeps_apart(host):
    aliases = {binding.alias(layer, i) for layer in range(16) for i in range(30)}
    assert len(aliases) == 480
    tok = host.model.cond_stage_model.tokenizer
    ids = {tuple(tok(a, add_special_tokens=False)["input_ids"]) for a in aliases}
    assert len(ids) == 480


def test_host_binding_cache_encodes_each_prompt_once(host):

    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    binder = binding.PromptBinder(model, [make_concept(model)])
    calls = []
    original = host.model.get_learned_conditioning
    host.model.get_learned_conditioning = lambda texts: calls.append(len(texts)) or original(texts)
    try:
        cache: dict = {}
        a = mos_host_binding.encode_bound(host.model, binder, ["<cat1> x", "y"], cache)
        b = mos_host_binding.encode_bound(host.model, binder, ["y", "<cat1> x"], cache)
    finally:
        del host.model.get_learned_conditioning
    assert calls == [1, 16] and torch.equal(a[0], b[1])  # a prompt without concept tokens: one pass
