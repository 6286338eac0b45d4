"""The host double's guards that extensions trip over in the real WebUI, and the product passing
them: the pickle guard that replaces `torch.load` (modules/safe.py) and the device the host keeps
textual-inversion vectors on (modules/devices.py, sd_hijack.EmbeddingsWithFixes)."""

from __future__ import annotations

import zipfile

import pytest
import torch

from lib_mos.concepts import synthetic
from lib_mos.concepts.files import read_concept
from lib_mos.models import sd1
from modules import safe


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


def _entries(path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return [n.split("/", 1)[1] for n in z.namelist()]


def test_guard_replaces_torch_load_like_the_host(tmp_path):
    """Recent torch's zips are refused (None, no exception); a torch 2.0-style zip loads by path but
    not through a file object, which the check leaves mid-file."""
    assert torch.load is safe.load and safe.unsafe_torch_load is torch.serialization.load
    obj = {"a": torch.arange(6.0).reshape(2, 3)}
    recent, old = tmp_path / "recent.pt", tmp_path / "old.pt"
    synthetic.save_torch_file(obj, recent, style="newer")
    synthetic.save_torch_file(obj, old, style="torch2.0")
    assert ".format_version" in _entries(recent) and ".format_version" not in _entries(old)

    before = len(safe.reports)
    assert torch.load(str(recent), map_location="cpu") is None
    assert len(safe.reports) == before + 1 and "may be malicious" in safe.reports[-1]
    assert torch.equal(torch.load(str(old), map_location="cpu", weights_only=True)["a"], obj["a"])
    with open(old, "rb") as fh, pytest.raises(Exception):  # noqa: B017 - torch raises several types here
        torch.load(fh, map_location="cpu", weights_only=True)


def test_guard_refuses_foreign_globals(tmp_path):
    path = tmp_path / "odd.pt"
    synthetic.save_torch_file({"x": torch.zeros(2), "f": torch.nn.Linear(2, 2)}, path, style="torch2.0")
    assert torch.load(str(path), map_location="cpu") is None
    assert "may be malicious" in safe.reports[-1]


@pytest.mark.parametrize("style", ["current", "newer", "torch2.0"])
@pytest.mark.parametrize("spelling", ["main", "research_branch"])
def test_authors_pth_reads_under_the_guard(tiny, tmp_path, style, spelling):
    """The authors' files of both spellings, written by old and new torch, read inside the host."""
    concept = synthetic.random_concept(tiny, ("<potter1>", "<potter2>"), seed=3)
    path = tmp_path / f"potter_{spelling}.pth"
    synthetic.save_torch_file(synthetic.authors_params(concept, spelling), path, style=style)
    got = read_concept(path)
    assert got.tokens == concept.tokens
    assert torch.equal(got.embeddings, concept.embeddings)
    name = next(iter(concept.unet_lora))
    assert torch.equal(got.unet_lora[name].up, concept.unet_lora[name].up)


def test_fake_accelerator_moves_are_remembered():
    from modules import devices

    with devices.fake_accelerator() as dev:
        assert dev.type == "cuda" and devices.device == dev
        t = torch.ones(3)
        on = t.to(devices.device, dtype=torch.float32)
        assert on.device == dev and t.device.type == "cpu"
        assert torch.zeros(2, device=dev).device == dev
        assert on.to("cpu").device.type == "cpu"
        assert torch.equal(devices.require_on_device(on, "x") * 2, t * 2)
        with pytest.raises(RuntimeError, match="same device"):
            devices.require_on_device(t, "x")
        with pytest.raises(RuntimeError, match="dtype"):
            devices.require_on_device(on.half(), "x", torch.float32)
    assert devices.device.type == "cpu"


def test_concept_tokens_bind_on_an_accelerator(host, tiny_checkpoint):
    """The host keeps embeddings on devices.device; rows left on the CPU fail there, like CUDA."""
    import importlib.util

    from lib_mos.concepts import binding
    from modules import devices

    spec = importlib.util.spec_from_file_location("mos_host_binding_for_test",
                                                  str(tests_root().parent / "scripts" / "mos_host_binding.py"))
    mos_host_binding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mos_host_binding)
    model = sd1.load_checkpoint(tiny_checkpoint)
    binder = binding.PromptBinder(model, [synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=5)])
    prompts = ["a photo of <cat1> <cat2>"]
    on_cpu = mos_host_binding.encode_bound(host.model, binder, prompts)
    with devices.fake_accelerator():
        on_gpu = mos_host_binding.encode_bound(host.model, binder, prompts)
    torch.testing.assert_close(on_gpu, on_cpu)
    torch.testing.assert_close(on_cpu[0], binder.encode(prompts)[0], rtol=1e-4, atol=1e-4)


def tests_root():
    from pathlib import Path

    return Path(__file__).resolve().parent
