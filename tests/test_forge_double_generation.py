"""Whole generations in the Forge double (`HostHarness(forge=True)`: Forge's engine surface, its
conditioning at CFG 1 and its CFG batching, uncond chunks first) against the same generations in
the A1111 double: concept binding and regions with region LoRAs must draw the same latents, in
one UNet call per step, with the step split by memory, at CFG 1, in one pass and in passes; the
alias embeddings never reach the next picture's infotext."""

from __future__ import annotations

import json
from pathlib import Path

import lora_layouts as layouts
import pytest
import torch

from lib_mos.concepts import synthetic
from lib_mos.concepts.files import write_concept
from lib_mos.models import sd1

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE = "a photo of <cat1> <cat2> on a sofa", "blurry"
SPEC = {"regions": [
    {"prompt": "a photo of <cat1> <cat2>", "negative": "dark", "box": [0, 0, 1, 0.5], "units": "fraction",
     "loras": [{"name": "x"}]},
    {"prompt": "a red bird", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
FIELDS = dict(steps=3, seed=5, batch_size=2, width=64, height=64)


def _files(folder: Path, checkpoint: Path) -> None:
    model = sd1.load_checkpoint(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    write_concept(synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4, name="cat"), folder / "cat.safetensors",
                  overwrite=True)
    layouts.kohya_locon(model, dtype=torch.float32, seed=7).save(folder, "x")


def _generate(tmp_path: Path, checkpoint: Path, forge: bool, runs: list[dict], setup=None) -> list:
    """Each run's result in a fresh harness (`setup()` called once it stands)."""
    from host_harness import HostHarness

    from modules import shared

    harness = HostHarness(tmp_path / ("forge" if forge else "a1111"), checkpoint, extensions=[str(ROOT)], forge=forge)
    try:
        if setup is not None:
            setup()
        _files(Path(shared.cmd_opts.lora_dir), checkpoint)
        results = []
        for run in runs:
            run = dict(run)
            spec = run.pop("spec", None)
            args = harness.script_args("Mix-of-Show", json.dumps(spec)) if spec else harness.script_args()
            results.append(harness.txt2img(run.pop("prompt", PROMPT), NEGATIVE, script_args=args, **FIELDS | run))
        return results
    finally:
        harness.close()


def latents(res) -> torch.Tensor:
    return torch.stack([im.latent for im in res.images])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


RUNS = [
    dict(),  # concept tokens only (the always-on script)
    dict(spec=SPEC),  # regions, one with a LoRA, one pass
    dict(spec=SPEC | {"passes": True}),  # a pass per region
    dict(spec=SPEC, cfg_scale=1),  # Forge: no negatives at all
    dict(spec=SPEC, prompt="two friends AND a sofa"),  # AND: one cond chunk per part
    dict(prompt="a photo of a sofa"),  # plain, after the bound ones: nothing of theirs left
]


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("forge-vs-a1111")
    return _generate(tmp, tiny_checkpoint, False, RUNS), _generate(tmp, tiny_checkpoint, True, RUNS)


@pytest.mark.parametrize("index", range(len(RUNS)), ids=["binding", "regions", "passes", "cfg1", "and", "plain"])
def test_forge_draws_what_a1111_draws(both, index):
    a1111, forge = both[0][index], both[1][index]
    assert relative(latents(forge), latents(a1111)) < 1e-5
    if index == 0:
        assert "Mix-of-Show concepts: <cat1> <cat2> from cat.safetensors@" in forge.info


def test_a_step_split_by_memory_draws_the_same(both, tmp_path, tiny_checkpoint):
    """Forge batches fewer chunks when memory is short: uncond and cond in calls of their own."""
    whole = both[1][1]  # the same regions in one call per step
    calls = []

    def short_of_memory():
        import backend.sampling.sampling_function as forge_sampling  # this harness's

        forge_sampling.MAX_ROWS = 2
        original = forge_sampling.calc_cond_uncond_batch

        def spy(apply_model, *args):
            return original(lambda x, t, c, o: calls.append(list(o["cond_or_uncond"])) or apply_model(x, t, c, o),
                            *args)

        forge_sampling.calc_cond_uncond_batch = spy

    split = _generate(tmp_path / "split", tiny_checkpoint, True, [dict(spec=SPEC)], short_of_memory)[0]
    assert calls[:2] == [[1], [0]]  # uncond first, each chunk its own call
    assert relative(latents(split), latents(whole)) < 1e-5


def test_binding_leaves_nothing_in_the_next_infotext(both):
    bound, plain = both[1][0], both[1][-1]
    assert "mosbind" not in bound.info and "mosbind" not in plain.info and "TI:" not in plain.info
