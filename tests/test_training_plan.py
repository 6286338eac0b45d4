"""The training tab's proposal (lib_mos.training.plan): steps, batch and resolution from the device
and its memory, the time estimate they show, and the caption templates a class word calls for."""

from __future__ import annotations

import math

import pytest

from lib_mos.training import plan
from lib_mos.training.data import TEMPLATES

GIB = 2**30


def test_the_estimate_reproduces_the_cpu_measurements_it_is_based_on():
    for resolution, batch, seconds in plan.CPU_MEASUREMENTS:
        got = plan.estimate_seconds(1, batch, resolution, "cpu", threads=plan.CPU_MEASURED_THREADS)
        assert got == pytest.approx(seconds, rel=0.1), (resolution, batch)
    assert plan.SPEEDS["cpu"].overhead > 0 and plan.SPEEDS["cpu"].per_sample_512 > 0


def test_the_estimate_grows_with_steps_batch_and_resolution():
    base = plan.estimate_seconds(100, 2, 256, "cpu", threads=2)
    assert plan.estimate_seconds(200, 2, 256, "cpu", threads=2) == pytest.approx(2 * base)
    def batch(b: int) -> float:
        return plan.estimate_seconds(100, b, 256, "cpu", threads=2)

    assert batch(4) - batch(2) == pytest.approx(batch(3) - batch(1)) and batch(4) > 1.5 * base  # linear
    assert 3 * base < plan.estimate_seconds(100, 2, 512, "cpu", threads=2) < 4 * base  # a fixed part per step
    assert 4 * plan.shape(256) < plan.shape(512) < 5 * plan.shape(256)  # attention grows faster than the pixels
    assert plan.shape(512) == pytest.approx(1.0)
    assert plan.shape(256) == pytest.approx(180 / 803, rel=0.05)  # SD1.5's UNet FLOPs at 256 / 512 px
    assert plan.shape(128) == pytest.approx((46 + 13) / (803 + 13), rel=0.1)  # the text encoder weighs in
    assert plan.estimate_seconds(0, 1, 64, "cpu") == 0.0
    # more CPU threads: faster, though not in proportion
    assert plan.estimate_seconds(100, 2, 256, "cpu", threads=8) < base / 2
    assert plan.estimate_seconds(100, 2, 256, "cpu", threads=8) > base / 4
    for bad in ((-1, 1, 64), (10, 0, 64), (10, 1, 0)):
        with pytest.raises(ValueError):
            plan.estimate_seconds(*bad, "cpu")


def test_a_gpu_is_minutes_and_a_cpu_days_for_the_authors_recipe():
    authors = (plan.AUTHORS.steps, plan.AUTHORS.batch_size, plan.AUTHORS.resolution)
    gpu = plan.estimate_seconds(*authors, "cuda")
    assert 5 * 60 <= gpu <= 30 * 60
    assert plan.estimate_seconds(*authors, "cuda:1") == gpu
    assert plan.estimate_seconds(*authors, "cpu", threads=2) > 12 * 3600
    assert plan.estimate_seconds(*authors, "mps") > gpu


@pytest.mark.parametrize(("memory_gib", "batch", "resolution"), [
    (80, 4, 512), (24, 4, 512), (16, 4, 512), (12, 2, 512), (8, 1, 512), (4, 1, 384), (None, 1, 512)])
def test_a_cuda_device_gets_the_authors_steps_and_the_batch_its_memory_holds(memory_gib, batch, resolution):
    memory = None if memory_gib is None else memory_gib * GIB
    proposed = plan.propose("cuda", memory)
    assert (proposed.steps, proposed.batch_size, proposed.resolution) == (1000, batch, resolution)
    assert proposed.seconds == pytest.approx(plan.estimate_seconds(1000, batch, resolution, "cuda"))
    assert plan.propose("cuda:0", memory) == proposed


@pytest.mark.parametrize("ram_gib", [None, 8, 64])
def test_a_small_cpu_gets_a_short_low_resolution_run_that_fits_the_budget(ram_gib):
    proposed = plan.propose("cpu", ram_gib and ram_gib * GIB, threads=2)
    assert (proposed.batch_size, proposed.resolution) == (1, 256)
    assert plan.MIN_STEPS <= proposed.steps < plan.AUTHORS.steps and proposed.steps % 10 == 0
    assert proposed.seconds <= plan.CPU_BUDGET_S
    assert proposed.seconds == pytest.approx(plan.estimate_seconds(proposed.steps, 1, 256, "cpu", threads=2))
    assert plan.estimate_seconds(proposed.steps + 10, 1, 256, "cpu", threads=2) > plan.CPU_BUDGET_S  # the most
    assert plan.propose("cpu", None, threads=1).steps < proposed.steps


@pytest.mark.parametrize(("threads", "ram_gib", "resolution", "steps"), [
    (16, None, 256, 1000),  # unknown RAM: never more than 256 px
    (16, 8, 256, 1000),  # 8 GiB holds no 384 px run
    (16, 16, 384, 1000),
    (16, 32, 512, 1000),
    (8, 32, 512, None),  # 512 px fits, with fewer steps
    (4, 32, 384, None),  # 512 px would leave too few steps
])
def test_a_bigger_cpu_gets_the_best_resolution_its_ram_and_the_budget_allow(threads, ram_gib, resolution, steps):
    proposed = plan.propose("cpu", ram_gib and ram_gib * GIB, threads=threads)
    assert (proposed.batch_size, proposed.resolution) == (1, resolution)
    assert plan.GOOD_STEPS <= proposed.steps <= plan.MAX_STEPS and proposed.seconds <= plan.CPU_BUDGET_S
    if steps is not None:
        assert proposed.steps == steps


def test_other_accelerators_get_batch_1_at_512_px_within_the_budget():
    for kind in ("mps", "xpu"):
        proposed = plan.propose(kind, None)
        assert (proposed.batch_size, proposed.resolution) == (1, 512)
        assert plan.MIN_STEPS <= proposed.steps <= plan.MAX_STEPS and proposed.seconds <= plan.CPU_BUDGET_S


def test_only_trainable_families_are_planned():
    with pytest.raises(ValueError, match=r"'sd2'.*sd1, sdxl"):
        plan.propose("cuda", 24 * GIB, "sd2")
    with pytest.raises(ValueError, match="'sd3'"):
        plan.estimate_seconds(10, 1, 512, "cuda", family="sd3")


def test_sdxl_costs_its_flops_and_trains_at_1024_px_on_a_gpu():
    """An SDXL ED-LoRA sample at 1024 px is SDXL's UNet FLOPs (6761 G) and 70 text copies (7980 G)
    against SD1.5's 1011 G at 512 px; 512 px SDXL still costs more than SD1.5 (its text copies)."""
    assert plan.sample_cost(1024, "sdxl") == pytest.approx((6761 + 7980) / 1011, rel=0.01)
    assert plan.sample_cost(768, "sdxl") == pytest.approx((3641 + 7980) / 1011, rel=0.01)
    assert plan.sample_cost(512, "sdxl") > 9 * plan.sample_cost(512, "sd1")
    sd1 = plan.estimate_seconds(100, 1, 512, "cuda")
    assert plan.estimate_seconds(100, 1, 1024, "cuda", family="sdxl") > 10 * sd1
    assert plan.propose("cpu", 32 * GIB, "sdxl", threads=2).resolution == 512


@pytest.mark.parametrize("gib, batch, resolution", [(80, 4, 1024), (24, 4, 1024), (16, 2, 1024), (12, 1, 1024),
                                                    (10, 1, 768)])
def test_an_sdxl_proposal_fits_the_gpu_by_the_computed_memory(gib, batch, resolution):
    """SDXL proposals always checkpoint (a 1024 px sample would need 36 GB without it), and what they
    propose fits the device by the plan's own memory table, with its headroom."""
    proposed = plan.propose("cuda", gib * GIB, "sdxl")
    assert (proposed.batch_size, proposed.resolution, proposed.gradient_checkpointing) == (batch, resolution, True)
    unet, text = plan.SDXL_MEMORY_GIB[(resolution, True)]
    assert plan.SDXL_WEIGHTS_GIB + batch * (unet + text) <= gib
    assert sum(plan.SDXL_MEMORY_GIB[(1024, False)]) + plan.SDXL_WEIGHTS_GIB > 24  # why it checkpoints
    assert not plan.propose("cuda", gib * GIB).gradient_checkpointing  # SD1 keeps the faster default


def test_durations_read_as_a_person_says_them():
    assert plan.format_duration(12.4) == "about 12 s"
    assert plan.format_duration(0.2) == "about 1 s"
    assert plan.format_duration(14 * 60) == "about 14 min"
    assert plan.format_duration(3.5 * 3600) == "about 3.5 h"
    assert plan.format_duration(3 * 86400) == "about 3.0 days"
    assert plan.format_duration(math.nan) == "unknown"


@pytest.mark.parametrize(("word", "templates"), [
    ("person", "human"), ("man", "human"), ("Women", "human"), ("young girl", "human"), ("knights", "human"),
    ("dog", "object"), ("red ball", "object"), ("car", "object"), ("", "object"), (None, "object"),
    ("painting", "style"), ("art style", "style")])
def test_the_caption_templates_follow_the_class_word(word, templates):
    assert plan.templates_for_class_word(word) == templates
    assert templates in TEMPLATES
