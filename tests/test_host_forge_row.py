"""The Forge row of the host layer (`scripts/mos_host_forge.py`) against the Forge double
(`tests/host_forge`, written from Forge's source): the host is detected as Forge, concept tokens
bind through Forge's own encoding engine exactly as the library binds them, the alias embeddings
leave no trace (database, infotext, console), and the row finds the UNet, the text encoders and
the empty prompt on Forge's model object."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lib_mos import hosts
from lib_mos.concepts import binding
from lib_mos.files import import_sibling
from lib_mos.models import sd1
from lib_mos.models.family import SD1

ROOT = Path(__file__).resolve().parents[1]


def _forget_script_modules() -> None:
    for key in [k for k in sys.modules if k.startswith("_mix_of_show_scripts.") or k.split(".")[0] in
                ("backend", "modules_forge")]:
        del sys.modules[key]


@pytest.fixture
def forge(monkeypatch):
    """The Forge double on sys.path and the scripts' modules loaded afresh in it (as in a Forge
    process); afterwards forgotten, so the next test detects its own host."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "host_forge"))
    _forget_script_modules()
    yield import_sibling(str(ROOT / "scripts" / "mos_generation.py"), "mos_host_binding")
    _forget_script_modules()


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(seed=0)


def engine_of(seed: int = 0):
    from backend.diffusion_engine import StableDiffusion

    return StableDiffusion(sd1.build_tiny_sd1(seed=seed))  # its own copy: the engine wraps the token embedding


def test_the_forge_double_is_detected_as_forge_and_its_row_is_picked(forge):
    mos_host = forge.mos_host
    assert hosts.detect() is hosts.FORGE and mos_host.SUPPORTED and mos_host.TRAINING_MESSAGE and mos_host.FUSION_MESSAGE and not mos_host.MESSAGE
    assert mos_host.ROW.__name__.endswith("mos_host_forge")
    engine = engine_of()
    assert mos_host.unet_of(engine) is engine.forge_objects.unet.model.diffusion_model
    assert not hasattr(engine, "model")  # what the A1111 row reads is not there


def test_concept_tokens_bind_through_forges_engine_as_the_library_binds_them(forge, tiny, capsys):
    from backend.text_processing import classic_engine
    from test_binding import make_concept

    binder = binding.PromptBinder(tiny, [make_concept(tiny)])
    prompts = ["a photo of <cat1> <cat2> on a sofa", "a dog"]
    ours = binder.encode(prompts)
    engine = engine_of()
    classic_engine.last_extra_generation_params.clear()
    classic_engine.last_extra_generation_params["TI"] = "someone"  # this generation's own, kept
    theirs = forge.encode_bound(engine, binder, prompts)
    assert theirs.shape == (2, 16, 77, 32)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert not engine.text_processing_engine.embeddings.word_embeddings  # the aliases are gone
    assert classic_engine.last_extra_generation_params == {"TI": "someone"}  # none reach the next infotext
    assert "mosbind" not in capsys.readouterr().out


def test_without_the_cleanup_the_aliases_would_leak(forge, tiny, capsys):
    """The double is not lenient: Forge's engine itself reports every alias it encodes."""
    from backend.text_processing import classic_engine
    from backend.text_processing.textual_inversion import Embedding

    engine = engine_of()
    e = Embedding(torch.zeros(1, 32), "mosbindaxa")
    e.vectors = 1
    engine.text_processing_engine.embeddings.register_embedding_by_name(e, "mosbindaxa")
    classic_engine.last_extra_generation_params.clear()
    engine.get_learned_conditioning(["a mosbindaxa"])
    assert "mosbindaxa" in classic_engine.last_extra_generation_params["TI"]
    assert "Used Embedding [mosbindaxa]" in capsys.readouterr().out


def test_text_encoders_and_the_empty_prompt_on_forges_model(forge):
    row = forge.mos_host.ROW
    engine = engine_of()
    encoders, fused = row.text_encoders(engine, SD1)
    assert fused is None and encoders == {"": engine.text_processing_engine.text_encoder.transformer}
    assert encoders[""].get_submodule("text_model.encoder.layers.0.self_attn.q_proj") is not None
    empty = row.empty_prompt(engine)
    assert empty.shape == (77, 32) and torch.equal(empty, engine.get_learned_conditioning([""])[0])
    assert row.embedding_widths(engine, SD1) == [32]
