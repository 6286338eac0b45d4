"""Region LoRAs (lib_mos.regional.loras) at module level: inside region r a hooked module gives what
the module gives with only r's LoRA merged into its weight (as the host's Lora merges it), outside
every region it gives the base module, for every LoRA kind the reader supports, on SD1 and SDXL
alike (every test runs on both tiny models); the live weights are never touched and the hooks go
away."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lora_layouts as layouts
import pytest
import torch
from torch import nn

from lib_mos.concepts.concept import Concept, LoraFactor
from lib_mos.concepts.files import read_concept
from lib_mos.models import sd1, sdxl
from lib_mos.models.attention import attend, attn2_processor
from lib_mos.regional.attention import RegionalContext, regional_attention
from lib_mos.regional.loras import (
    RegionDeltas,
    RegionLora,
    RegionLoraChoice,
    choose_region_loras,
    global_lora_names,
)
from lib_mos.regional.regions import Region, RegionError, RegionSpec, layer_masks, level_masks

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SIZE = 64  # px: an 8x8 latent, the UNet's first level
# region 0: the left half; region 1: the bottom-right quarter; the top-right quarter is global only
SPEC = RegionSpec((Region("a", box=(0.0, 0.0, 1.0, 0.5), units="fraction"),
                   Region("b", box=(0.5, 0.5, 1.0, 1.0), units="fraction")))
WEIGHTS = (1.0, 0.7)  # region 1's LoRA at a weight other than 1

Build = Callable[..., layouts.LoraFile]
KINDS: dict[str, Build] = {
    "kohya LoRA fp16": lambda m, seed: layouts.kohya_lora(m, dtype=F16, seed=seed, few=True),
    "LoCon bf16 (convs, time_emb_proj)": lambda m, seed: layouts.kohya_locon(m, spelling="ldm", dtype=BF16, seed=seed,
                                                                              few=True),
    "LoCon Tucker": lambda m, seed: layouts.kohya_locon(m, dtype=F16, tucker=True, seed=seed, few=True),
    "LoHa": lambda m, seed: layouts.loha(m, dtype=F32, seed=seed, few=True),
    "LoHa Tucker bf16": lambda m, seed: layouts.loha(m, spelling="ldm", dtype=BF16, tucker=True, seed=seed, few=True),
    "LoKr": lambda m, seed: layouts.lokr(m, dtype=F32, seed=seed, few=True),
    "full diff with diff_b": lambda m, seed: layouts.full(m, dtype=F32, seed=seed, few=True),
    "DoRA fp16": lambda m, seed: layouts.dora(m, dtype=F16, seed=seed, few=True),
    "LoRA with bias part": lambda m, seed: layouts.bias_diff(m, dtype=F32, seed=seed, few=True),
}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request, tiny_checkpoint) -> sd1.SD1Model | sdxl.SDXLModel:
    return sd1.load_checkpoint(tiny_checkpoint) if request.param == "sd1" else sdxl.build_tiny_sdxl(seed=0)


_EMBEDDING_MLPS = ("time_embed", "label_emb")


def without_time_embed(lora: layouts.LoraFile) -> layouts.LoraFile:
    """The file minus its embedding-MLP layers, which a region cannot confine (tested below)."""
    return layouts.LoraFile({k: v for k, v in lora.tensors.items() if not any(m in k for m in _EMBEDDING_MLPS)},
                            lora.metadata)


def read(lora: layouts.LoraFile, folder: Path, name: str, model) -> Concept:
    return read_concept(lora.save(folder, name), trigger="", family=model.family)


def two_loras(model, build: Build, folder: Path) -> tuple[Concept, Concept]:
    return (read(without_time_embed(build(model, 11)), folder, "a", model),
            read(without_time_embed(build(model, 12)), folder, "b", model))


def level0(model) -> torch.Tensor:
    """[2, 64]: SPEC's masks at the latent resolution (8x8), where `sample_input`'s outputs lie."""
    return level_masks(SPEC, SIZE, SIZE, family=model.family)[(8, 8)]


def unet_call(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The UNet on (x, t, context), SDXL's with a fixed pooled/size vector."""
    if model.family is sd1.SD1Model.family:
        return model.unet(x, t, context)
    y = torch.randn(x.shape[0], model.config.vector_dim, generator=torch.Generator().manual_seed(9))
    return model.unet(x, t, context=context, y=y)


@contextmanager
def merged(model: sd1.SD1Model, concept: Concept, weight: float) -> Iterator[None]:
    """The concept's changes (the host's formula, every factor in float32) added to the weights.
    The host's own merge rounds a layer's weight to the file's dtype for LoHa/LoKr/full files in
    fp16/bf16; a region's hook adds the change to the output and keeps the weight as it is, so the
    reference here is the exact sum."""
    saved = []
    try:
        for root, lora in ((model.unet, concept.unet_lora), (model.text_root, concept.text_lora)):
            for name, delta in lora.items():
                layer = root.get_submodule(name)
                saved.append((layer, layer.weight.data, None if layer.bias is None else layer.bias.data))
                base = layer.weight.data.float()
                change = (delta.delta() if isinstance(delta, LoraFactor)
                          else delta.weight_delta(base, torch.float32, upcast=True)).reshape(base.shape) * weight
                layer.weight.data = layer.weight.data + change.reshape(layer.weight.shape)
                bias = delta.bias_delta()
                if bias is not None:
                    layer.bias.data = layer.bias.data + bias.float() * weight
        yield
    finally:
        for layer, weight_data, bias_data in reversed(saved):
            layer.weight.data = weight_data
            if bias_data is not None:
                layer.bias.data = bias_data


def snapshot(model: sd1.SD1Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in (*model.unet.state_dict().items(), *model.text_root.state_dict().items())}


def sample_input(module: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """An input whose output lies on the 8x8 level (stride-2 convs get a 16x16 input)."""
    if isinstance(module, nn.Conv2d):
        side = 8 * module.stride[0]
        return torch.randn(2, module.in_channels, side, side, generator=gen)
    return torch.randn(2, 64, module.in_features, generator=gen)


def positions(out: torch.Tensor, conv: bool) -> torch.Tensor:
    """[B, positions, channels] whatever the layer kind."""
    return out.flatten(2).transpose(1, 2) if conv else out


def assert_by_region(got: torch.Tensor, base: torch.Tensor, only: list[torch.Tensor], masks: torch.Tensor,
                     what: str) -> None:
    """`got` equals only[r] where region r is and `base` outside every region ([B, positions, C])."""
    scale = base.abs().max().item() + 1e-6
    inside = masks.bool()
    for r, want in enumerate(only):
        assert not torch.allclose(want[:, inside[r]], base[:, inside[r]], atol=1e-4 * scale), f"{what}: no change"
        torch.testing.assert_close(got[:, inside[r]], want[:, inside[r]], rtol=1e-4, atol=2e-5 * scale,
                                   msg=lambda m, r=r: f"{what}, inside region {r}: {m}")
    outside = ~inside.any(0)
    assert outside.any()
    torch.testing.assert_close(got[:, outside], base[:, outside], rtol=1e-5, atol=1e-6 * scale,
                               msg=lambda m: f"{what}, outside the regions: {m}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_inside_each_region_a_module_is_the_module_with_that_regions_lora_only(model, tmp_path, kind):
    a, b = two_loras(model, KINDS[kind], tmp_path)
    before = snapshot(model)
    deltas = RegionDeltas(model.unet, [RegionLora(0, a, WEIGHTS[0]), RegionLora(1, b, WEIGHTS[1])], 2)
    deltas.set_masks(level_masks(SPEC, SIZE, SIZE, family=model.family))
    gen = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        cases = {name: (plan.module, sample_input(plan.module, gen)) for name, plan in deltas.plans.items()
                 # no positions: checked through their attention and their block below
                 if not (".attn2.to_k" in name or ".attn2.to_v" in name or name.endswith("emb_layers.1"))}

        def outputs() -> dict[str, torch.Tensor]:
            return {n: positions(m(x), isinstance(m, nn.Conv2d)) for n, (m, x) in cases.items()}

        base = outputs()
        only = []
        for concept, weight in zip((a, b), WEIGHTS):  # each LoRA merged once for every module
            with merged(model, concept, weight):
                only.append(outputs())
        with deltas.installed():
            got = outputs()
    for name in cases:
        assert_by_region(got[name], base[name], [o[name] for o in only], level0(model), f"{kind}: {name}")
        checked += 1
    assert checked >= 10
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.unet.modules())
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_cross_attention_gets_each_regions_lora_on_its_own_context(model, tmp_path):
    """attn2: to_q / to_out changed by position, to_k / to_v on the region's own context only."""
    a, b = two_loras(model, KINDS["kohya LoRA fp16"], tmp_path)
    name = model.family.attn2[0]
    module = model.unet.get_submodule(name)
    assert {f"{name}.to_k", f"{name}.to_v", f"{name}.to_q"} <= set(a.unet_lora)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, module.to_q.in_features, generator=gen)
    context = torch.randn(2, 77, module.to_k.in_features, generator=gen)
    region_context = torch.randn(2, 2, 77, module.to_k.in_features, generator=gen)
    masks = level0(model)
    deltas = RegionDeltas(model.unet, [RegionLora(0, a, WEIGHTS[0]), RegionLora(1, b, WEIGHTS[1])], 2)
    deltas.set_masks(level_masks(SPEC, SIZE, SIZE, family=model.family))
    with torch.no_grad():
        base = attend(module, x, context)
        only = []
        for r, (concept, weight) in enumerate(zip((a, b), WEIGHTS)):
            with merged(model, concept, weight):
                only.append(attend(module, x, region_context[:, r]))
        with deltas.installed():
            got = regional_attention(module, x, context, region_context, masks.expand(2, -1, -1), None,
                                     deltas.context_delta)
    assert_by_region(got, base, only, masks, "attn2")


def test_the_global_prompts_share_inside_a_region_is_read_through_that_regions_lora(model, tmp_path):
    """With global_weight g, inside region r the output is (1 - g) of the region prompt and g of
    the global prompt, both as the layer with only r's LoRA reads them; outside, the base layer."""
    a, b = two_loras(model, KINDS["kohya LoRA fp16"], tmp_path)
    module = model.unet.get_submodule(model.family.attn2[0])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, module.to_q.in_features, generator=gen)
    context = torch.randn(2, 77, module.to_k.in_features, generator=gen)
    region_context = torch.randn(2, 2, 77, module.to_k.in_features, generator=gen)
    masks = level0(model)
    g = torch.tensor([0.5, 0.25])
    deltas = RegionDeltas(model.unet, [RegionLora(0, a, WEIGHTS[0]), RegionLora(1, b, WEIGHTS[1])], 2)
    deltas.set_masks(level_masks(SPEC, SIZE, SIZE, family=model.family))
    processor = RegionalContext()
    processor.set_rows(region_context, [masks.expand(2, -1, -1)] * len(model.family.attn2), global_weight=g)
    processor.context_delta = deltas.context_delta
    with torch.no_grad():
        base = attend(module, x, context)
        only = []
        for r, (concept, weight) in enumerate(zip((a, b), WEIGHTS)):
            with merged(model, concept, weight):
                only.append(g[r] * attend(module, x, context) + (1 - g[r]) * attend(module, x, region_context[:, r]))
        with deltas.installed():
            got = processor(module, 0, x, context)
    assert_by_region(got, base, only, masks, "attn2")


def assert_feature_map_by_region(model: sd1.SD1Model, loras: tuple[Concept, Concept], block: nn.Module,
                                 run: Callable[[], object], what: str) -> None:
    """A ResBlock's feature map (the input of its out_layers: h + the time projection), seen while
    `run()` runs: with the two region LoRAs hooked, each region's single-LoRA map inside it and the
    base map outside."""
    seen: list[torch.Tensor] = []

    def feature_map() -> torch.Tensor:
        handle = block.out_layers.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            run()
        finally:
            handle.remove()
        return positions(seen.pop(), True)

    deltas = RegionDeltas(model.unet, [RegionLora(r, c, w) for r, (c, w) in enumerate(zip(loras, WEIGHTS))], 2)
    deltas.set_masks(level_masks(SPEC, SIZE, SIZE, family=model.family))
    with torch.no_grad():
        base = feature_map()
        only = []
        for concept, weight in zip(loras, WEIGHTS):
            with merged(model, concept, weight):
                only.append(feature_map())
        with deltas.installed():
            got = feature_map()
    assert_by_region(got, base, only, level0(model), what)


def test_a_resblocks_time_embedding_projection_lands_only_in_the_region(model, tmp_path):
    """emb_layers.1 has no positions: its change reaches the block's feature map (the input of
    out_layers) only where the region is."""
    a, b = two_loras(model, KINDS["LoCon bf16 (convs, time_emb_proj)"], tmp_path)
    name = next(n[: -len(".emb_layers.1")] for n in a.unet_lora if n.endswith("emb_layers.1"))
    block = model.unet.get_submodule(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, block.channels, 8, 8, generator=gen)
    emb = torch.randn(2, block.emb_layers[1].in_features, generator=gen)
    assert_feature_map_by_region(model, (a, b), block, lambda: block(x, emb), "ResBlock feature map")


def test_weight_zero_hooks_nothing_and_the_text_encoder_gets_the_whole_change(model, tmp_path):
    a, _ = two_loras(model, KINDS["kohya LoRA fp16"], tmp_path)
    assert not RegionDeltas(model.unet, [RegionLora(0, a, 0.0)], 1)
    assert {e.root for e in model.family.text_encoders} == {n[:2] if n[0].isdigit() else "" for n in a.text_lora}
    tokens = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
    tokens[:, -1] = 49407  # an EOS, where SDXL's pooled vector is read

    def encode() -> torch.Tensor:
        if model.family is sd1.SD1Model.family:
            return model.text_encoder(tokens).last_hidden_state
        cond = model.encode_ids(tokens)
        return torch.cat([cond["crossattn"].flatten(1), cond["vector"]], 1)

    with torch.no_grad():
        base = encode()
        with RegionDeltas(model.text_root, [RegionLora(0, a, 0.6)], 1, masked=False, text=True).installed():
            got = encode()
        with merged(model, a, 0.6):
            want = encode()
    assert (want - base).norm() > 1e-2 * base.norm()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def only_time_embedding(lora: layouts.LoraFile) -> layouts.LoraFile:
    """The file's embedding-MLP layers alone: the time embedding (and SDXL's vector embedding)."""
    return layouts.LoraFile({k: v for k, v in lora.tensors.items() if any(m in k for m in _EMBEDDING_MLPS)},
                            lora.metadata)


def test_a_time_embedding_change_reaches_each_block_only_inside_its_region(model, tmp_path):
    """time_embed feeds every ResBlock at once: each region gets its own embedding, and the first
    block's feature map (conv_in and its in_layers unchanged) is the single-LoRA one inside each
    region and the base one outside."""
    a = read(only_time_embedding(layouts.loha(model, seed=11, few=True)), tmp_path, "a", model)
    b = read(only_time_embedding(layouts.loha(model, seed=12, few=True)), tmp_path, "b", model)
    mlps = {"time_embed.0", "time_embed.2"} | ({"label_emb.0.0", "label_emb.0.2"} if model.family.vector_dim else set())
    assert set(a.unet_lora) == mlps
    block = model.unet.get_submodule("input_blocks.1.0")
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500.0, 20.0])
    context = torch.randn(2, 77, model.config.context_dim, generator=gen)
    assert_feature_map_by_region(model, (a, b), block, lambda: unet_call(model, x, t, context), "embedding MLPs")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.unet.modules())


@pytest.mark.parametrize("kind", ["LoHa", "full diff with diff_b", "LoCon bf16 (convs, time_emb_proj)"])
def test_a_region_covering_the_image_is_the_whole_lora_in_the_unet(model, tmp_path, kind):
    """Every layer at once, time embedding, conv_in and conv_out included."""
    lora = read(KINDS[kind](model, 13), tmp_path, "x", model)
    spec = RegionSpec((Region("x", box=(0.0, 0.0, 1.0, 1.0), units="fraction"),))
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([700.0, 3.0])
    context = torch.randn(2, 77, model.config.context_dim, generator=gen)
    masks = layer_masks(spec, SIZE, SIZE, family=model.family)
    deltas = RegionDeltas(model.unet, [RegionLora(0, lora, 0.8)], 1)
    deltas.set_masks(level_masks(spec, SIZE, SIZE, family=model.family))
    regional = RegionalContext(context.unsqueeze(1), masks)  # attn2 k/v changes apply to the region's context
    regional.context_delta = deltas.context_delta
    with torch.no_grad():
        with merged(model, lora, 0.8):
            want = unet_call(model, x, t, context)
        with deltas.installed(), attn2_processor(model.unet, regional):
            got = unet_call(model, x, t, context)
        base = unet_call(model, x, t, context)
    assert (want - base).norm() > 1e-2 * base.norm()
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_which_loras_each_region_applies(tmp_path):
    files = {n: tmp_path / f"{n}.safetensors" for n in ("potter", "hermione", "cat")}
    spec = RegionSpec.from_json({"regions": [
        {"prompt": "a boy <lora:hermione:0.5>", "box": [0, 0, 1, 0.5], "units": "fraction",
         "loras": [{"name": "potter", "weight": 0.8}]},
        {"prompt": "<cat1> <cat2> sitting", "box": [0, 0.5, 1, 1], "units": "fraction"},
        {"prompt": "<cat1> <cat2> again", "box": [0, 0, 1, 1], "units": "fraction", "loras": [{"name": "cat"}]}]})
    cat = {"<cat1>": files["cat"], "<cat2>": files["cat"]}
    chosen = choose_region_loras(spec, files, "models/Lora", [{}, cat, cat], set())
    assert chosen == [RegionLoraChoice(0, "potter", files["potter"], 0.8, "listed"),
                      RegionLoraChoice(0, "hermione", files["hermione"], 0.5, "listed"),
                      RegionLoraChoice(1, "cat", files["cat"], 1.0, "token <cat1>"),
                      RegionLoraChoice(2, "cat", files["cat"], 1.0, "listed")]  # listed once, not again by token
    globally = global_lora_names(["a photo, <lora:cat:0.6> and <lyco:other:1:0.5>"])
    assert globally == {"cat", "other"}
    assert [c.region for c in choose_region_loras(spec.__class__(spec.regions[:2]), files, "x", [{}, cat], globally)] \
        == [0, 0]  # the token's LoRA is applied to the whole image already
    with pytest.raises(RegionError, match=r"region 2.*'cat' is already applied to the whole image"):
        choose_region_loras(spec, files, "models/Lora", [{}, cat, cat], globally)
    with pytest.raises(RegionError, match=r"region 0.*no LoRA named 'potter' in models/Lora \(did you mean potter_v2"):
        choose_region_loras(spec, {"potter_v2": files["potter"]}, "models/Lora", [{}, {}, {}], set())


def test_the_cached_region_selector_gives_what_one_built_anew_gives():
    """Each plan keeps its [K, R] column-to-region selector between calls: the second call of
    `_per_region` / `_each_region` gives what the first gave and what each region's own LoRA gives
    computed from scratch, for another region count too, and for a plan whose columns differ."""
    gen = torch.Generator().manual_seed(6)
    root = nn.Module()
    root.proj, root.other = nn.Linear(8, 5), nn.Linear(8, 5)

    def lora(*names: str) -> Concept:
        factors = {n: LoraFactor(torch.randn(2, 8, generator=gen), torch.randn(5, 2, generator=gen), 0.5)
                   for n in names}
        return Concept(name="c", tokens=(), embeddings=torch.zeros(0, 1, 8), unet_lora=factors)

    a, b = lora("proj"), lora("proj", "other")
    deltas = RegionDeltas(root, [RegionLora(0, a, 1.0), RegionLora(1, b, 0.7)], 3)
    change = {(name, r): c.unet_lora[name].delta() * w for r, c, w in ((0, a, 1.0), (1, b, 0.7))
              for name in c.unet_lora}
    x, xk = torch.randn(4, 8, generator=gen), torch.randn(4, 3, 6, 8, generator=gen)
    for name in ("proj", "other"):
        plan = deltas.plans[name]
        zero = torch.zeros(5, 8)
        per = torch.stack([x @ change.get((name, r), zero).T for r in range(3)], 1)  # [4, K, 5]
        each = torch.stack([xk[:, r] @ change.get((name, r), zero).T for r in range(3)], 1)  # [4, K, 6, 5]
        for _ in range(2):  # built on the first call, reused on the second
            torch.testing.assert_close(deltas._per_region(plan, x, torch.empty(4, 5)), per)
            torch.testing.assert_close(deltas._each_region(plan, xk), each)
            torch.testing.assert_close(deltas._each_region(plan, xk[:, :2]), each[:, :2])  # K = 2
        fresh = (torch.tensor(plan.cols).unsqueeze(0) == torch.arange(3).unsqueeze(1)).float()
        assert plan.selector(3, torch.float32, x.device) is plan.selector(3, torch.float32, x.device)
        assert torch.equal(plan.selector(3, torch.float32, x.device), fresh)
        assert torch.equal(plan.selector(2, torch.float32, x.device), fresh[:2])
