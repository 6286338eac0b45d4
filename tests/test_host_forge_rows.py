"""Forge's row order: a UNet call's rows come in chunks, uncond first, each chunk named in
`transformer_options["cond_or_uncond"]`, and at CFG scale 1 there is no uncond chunk at all. The
Forge host row names each call's rows for the regional attention; these tests check, on the tiny
SD1 UNet, that every row gets its own prompts wherever Forge puts it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lib_mos.models import sd1
from lib_mos.models.attention import attn2_processor
from lib_mos.regional.attention import SteppedRegionalContext

ROOT = Path(__file__).resolve().parents[1]


def forge_row():
    spec = importlib.util.spec_from_file_location("mos_host_forge_for_test", ROOT / "scripts" / "mos_host_forge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_of_a_call_follow_its_chunks():
    rows_of_call = forge_row().rows_of_call
    assert rows_of_call([1, 0], 4, 2, 2).tolist() == [2, 3, 0, 1]  # uncond chunk first, as Forge batches
    assert rows_of_call([0], 2, 2, 2).tolist() == [0, 1]  # CFG 1 or a call of its own
    assert rows_of_call([1], 3, 3, 3).tolist() == [3, 4, 5]
    assert rows_of_call([1, 0, 0], 6, 4, 2).tolist() == [4, 5, 0, 1, 0, 1]  # AND: each part a cond chunk
    with pytest.raises(RuntimeError, match="chunks of 3 rows but the step has 2 uncond"):
        rows_of_call([1, 0], 6, 3, 2)
    with pytest.raises(RuntimeError, match="5 rows in chunks"):
        rows_of_call([1, 0], 5, 3, 2)


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(seed=3)


def _step(tiny, n: int):
    """A step plan for n images: cond rows, then uncond rows, each row its own context and the
    two halves of the picture two regions with contexts of their own (cond: prompts, uncond:
    negatives)."""
    g = torch.Generator().manual_seed(1)
    d = tiny.config.context_dim
    context = torch.randn(2 * n, 77, d, generator=g)
    region = torch.randn(2, 2, 77, d, generator=g)  # [cond/uncond, K, T, D]
    rows = torch.tensor([0] * n + [1] * n)
    weights = []
    for size in (64, 64, 16, 16, 4, 4, 1, 4, 4, 4, 16, 16, 16, 64, 64, 64):  # 8x8 latent: each attn2's positions
        m = torch.zeros(2, size)
        m[0, : size // 2], m[1, size // 2:] = 1.0, 1.0
        weights.append(m)
    return context, region, rows, weights


def _run(tiny, order: list[int], n: int, kinds: list[int] | None) -> torch.Tensor:
    """The UNet on the step's rows taken in `order` (a Forge call names them by `kinds`; None: the
    rows in A1111's order, taken as they come)."""
    processor = SteppedRegionalContext()
    context, region, rows, weights = _step(tiny, n)
    x = torch.randn(2 * n, 4, 8, 8, generator=torch.Generator().manual_seed(2))[:n].repeat(2, 1, 1, 1)
    processor.set_step(region, weights, context=context, rows=rows)
    unet = tiny.unet
    order_t = torch.tensor(order)
    options = {} if kinds is None else {"transformer_options": {"cond_or_uncond": kinds}}
    with torch.no_grad(), attn2_processor(unet, processor), \
            forge_row().call_rows(unet, processor.begin_call, lambda: (n, n)):
        return unet(x[order_t], torch.full((len(order),), 500), context=context[order_t], **options)


def test_forge_rows_get_the_same_prompts_as_a1111_rows(tiny):
    """Two images at CFG > 1: A1111's call is [c0 c1 u0 u1], Forge's [u0 u1 c0 c1]; each row's output
    must be the same. Taking Forge's rows in order would give its uncond rows the cond prompts."""
    a1111 = _run(tiny, [0, 1, 2, 3], 2, None)
    forge = _run(tiny, [2, 3, 0, 1], 2, [1, 0])
    torch.testing.assert_close(forge, a1111[[2, 3, 0, 1]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a1111[:2], a1111[2:], atol=1e-3)  # cond and uncond rows differ


def test_forge_at_cfg_1_has_only_cond_rows(tiny):
    a1111 = _run(tiny, [0, 1, 2, 3], 2, None)
    forge = _run(tiny, [0, 1], 2, [0])
    torch.testing.assert_close(forge, a1111[:2], rtol=1e-4, atol=1e-5)
    only_uncond = _run(tiny, [2, 3], 2, [1])  # a step split by memory: the uncond chunk alone
    torch.testing.assert_close(only_uncond, a1111[2:], rtol=1e-4, atol=1e-5)
