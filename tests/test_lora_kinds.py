"""Every LoRA kind the host's built-in Lora applies to SD1, in the layouts the trainers write
(tests/lora_layouts.py), read as concepts.

A concept read from a file changes the tiny model exactly as `<lora:name:...>` changes it in the
host double (weights and biases `torch.equal`, every multiplier), our format written from it
applies exactly as the original in the double, trigger words come from the right place, and every
bad file is one ConceptError that names it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import lora_layouts as layouts
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lib_mos.concepts.concept import Concept, ConceptError, LoraFactor, ModuleDelta, applied
from lib_mos.concepts.files import check_against_model, read_concept, write_concept
from lib_mos.models import sd1

Snapshot = dict[tuple[str, str, str], torch.Tensor]
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> sd1.SD1Model:
    """The host double's checkpoint, loaded outside the host (applied() restores it bit for bit,
    so the tests share it)."""
    return sd1.load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory, tiny_checkpoint):
    """One host double for this module's generations (starting one per test would dominate the
    run time): every test's files have names of their own, and the host applies a prompt's set of
    networks over each layer's original weights, whatever the previous generation applied."""
    from host_harness import HostHarness

    harness = HostHarness(tmp_path_factory.mktemp("host"), tiny_checkpoint)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def lora_host(one_host):
    from modules import errors

    errors.reported.clear()
    return one_host


def lora_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.lora_dir)


def snapshot(unet: nn.Module, text_encoder: nn.Module, clone: bool = True) -> Snapshot:
    """Every Linear / Conv2d weight and bias of the two models, by (part, module name, tensor);
    `clone=False`: the live tensors, for comparing at once."""
    out: Snapshot = {}
    for kind, root in (("unet", unet), ("text", text_encoder)):
        for name, m in root.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                for part in ("weight", "bias"):
                    t = getattr(m, part)
                    if t is not None:
                        out[(kind, name, part)] = t.detach().clone() if clone else t.detach()
    return out


def host_applies(host, tags: str) -> Snapshot:
    """The host's weights after a generation with `tags` in the prompt; no network may fail or be missing."""
    from modules import errors

    res = host.txt2img(f"a photo {tags}", steps=1)
    assert errors.reported == [], errors.reported
    assert "Networks with errors" not in res.comments and "not found" not in res.comments, res.comments
    return snapshot(host.model.model.diffusion_model, host.model.cond_stage_model.wrapped.transformer)


def assert_applies_as(model: sd1.SD1Model, items: list[tuple[Concept, float, float]], want: Snapshot,
                      what: str) -> None:
    """applied(items) gives the model exactly `want`, and afterwards its weights are what they were."""
    before = snapshot(model.unet, model.text_encoder)
    with applied(items, model.unet, model.text_encoder):
        assert_same(snapshot(model.unet, model.text_encoder, clone=False), want, f"{what}: applied()")
    assert_same(snapshot(model.unet, model.text_encoder, clone=False), before, f"{what}: after applied()")


def assert_same(got: Snapshot, want: Snapshot, what: str) -> None:
    assert got.keys() == want.keys()
    differ = [f"{k[1]}.{k[2]}" for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def changed(after: Snapshot, before: Snapshot) -> set[tuple[str, str]]:
    return {(k[0], k[1]) for k in before if not torch.equal(after[k], before[k])}


# ----------------------------------------------------------------------- every kind, like the host
Build = Callable[[sd1.SD1Model], layouts.LoraFile]
# Each kind in both key spellings and in the dtypes trainers save. kohya LoRAs on every layer they
# train, the other kinds on a sample of blocks that has every layer type (`layouts.sample`).
KINDS: dict[str, dict[str, Build]] = {
    "kohya LoRA": {
        "diffusers keys, fp16": lambda m: layouts.kohya_lora(m, dtype=F16),
        "ldm keys and lora_te1, bf16, no alpha": lambda m: layouts.kohya_lora(m, spelling="ldm", dtype=BF16,
                                                                              alpha=None),
    },
    "LoCon": {
        "kohya, diffusers keys, fp32": lambda m: layouts.kohya_locon(m, dtype=F32, few=True),
        "kohya, ldm keys, bf16": lambda m: layouts.kohya_locon(m, spelling="ldm", dtype=BF16, few=True),
        "Tucker cores, ldm keys, fp16": lambda m: layouts.kohya_locon(m, spelling="ldm", dtype=F16, tucker=True,
                                                                      few=True),
    },
    "LoHa": {
        "diffusers keys, fp32": lambda m: layouts.loha(m, dtype=F32, few=True),
        "Tucker cores, ldm keys, bf16": lambda m: layouts.loha(m, spelling="ldm", dtype=BF16, tucker=True,
                                                               few=True),
    },
    "LoKr": {
        "diffusers keys, fp32": lambda m: layouts.lokr(m, dtype=F32, few=True),
        "ldm keys, bf16": lambda m: layouts.lokr(m, spelling="ldm", dtype=BF16, few=True),
    },
    "full diff": {
        "diffusers keys, fp32": lambda m: layouts.full(m, dtype=F32, few=True),
        "ldm keys, bf16": lambda m: layouts.full(m, spelling="ldm", dtype=BF16, few=True),
    },
    "DoRA and bias diffs": {
        "DoRA, diffusers keys, fp16": lambda m: layouts.dora(m, dtype=F16, few=True),
        "DoRA, ldm keys, bf16": lambda m: layouts.dora(m, spelling="ldm", dtype=BF16, few=True),
        "LoRA with a bias diff, fp32": lambda m: layouts.bias_diff(m, dtype=F32, few=True),
    },
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_applies_as_the_host_applies_it(lora_host, model, kind):
    """read_concept + applied() give the host's weights and biases bit for bit, on exactly the
    file's layers; our format written from the concept applies in the host as the original does
    (read back, it is the same concept: test_our_format_keeps_each_layers_parts_and_dtype)."""
    host = lora_host
    original = host_applies(host, "")  # without <lora:...>: every layer's original
    assert_same(original, snapshot(model.unet, model.text_encoder, clone=False), "the host's model, no LoRA")
    for i, (layout, build) in enumerate(KINDS[kind].items()):
        what, name = f"{kind}, {layout}", f"{kind.split()[0]}{i}"
        file = build(model)
        concept = read_concept(file.save(lora_dir(), name))
        check_against_model(concept, model)
        assert len(concept.unet_lora) + len(concept.text_lora) == len(file.layers), what

        in_host = host_applies(host, f"<lora:{name}:1>")
        assert changed(in_host, original) == set(file.layers), what
        assert_applies_as(model, [(concept, 1.0, 1.0)], in_host, what)

        write_concept(concept, lora_dir() / f"{name}_ours.safetensors")
        assert_same(host_applies(host, f"<lora:{name}_ours:1>"), in_host, f"{what}: our format in the host")


@pytest.mark.parametrize("kind", ["locon_tucker", "loha", "lokr", "full", "dora"])
def test_our_format_keeps_each_layers_parts_and_dtype(model, tmp_path, kind):
    """fp16 files (the host computes LoHa/LoKr/full in the file's dtype, so the dtype matters):
    every part read and written back unchanged, dtype included; alpha keeps its value."""
    file = {"locon_tucker": lambda: layouts.kohya_locon(model, dtype=F16, tucker=True, few=True),
            "loha": lambda: layouts.loha(model, dtype=F16, tucker=True, few=True),
            "lokr": lambda: layouts.lokr(model, dtype=F16, few=True),
            "full": lambda: layouts.full(model, dtype=F16, few=True),
            "dora": lambda: layouts.dora(model, dtype=F16, few=True)}[kind]()
    concept = read_concept(file.save(tmp_path, "orig"))
    back = read_concept(write_concept(concept, tmp_path / "ours.safetensors"))
    for kind_, name in file.layers:
        stem = layouts.key_stem((kind_, name), "diffusers")
        a = (concept.unet_lora if kind_ == "unet" else concept.text_lora)[name]
        b = (back.unet_lora if kind_ == "unet" else back.text_lora)[name]
        if isinstance(a, LoraFactor):  # plain linear LoRA: float32 factors, alpha = scale * rank
            assert isinstance(b, LoraFactor) and torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
            assert a.scale == b.scale
            continue
        assert isinstance(b, ModuleDelta) and a.kind == b.kind and a.parts.keys() == b.parts.keys()
        for part, t in a.parts.items():
            if part == "alpha":
                assert t.item() == b.parts[part].item() == file.tensors[f"{stem}.alpha"].item()
            else:
                assert t.dtype == b.parts[part].dtype == F16 and torch.equal(t, b.parts[part]), (name, part)
                assert torch.equal(t, file.tensors[f"{stem}.{part}"]), (name, part)


# ------------------------------------------------------------------------------------ multipliers
def test_text_and_unet_multipliers_and_stacking_match_the_host(lora_host, model):
    """`<lora:name:te:unet>` and `te=`/`unet=` match applied([(c, unet, te)]); several files stack
    in prompt order (DoRA on top of a LoRA on the same layers decomposes the already changed weight)."""
    files = {"mult_lo": layouts.kohya_lora(model, dtype=F16, few=True),
             "mult_ha": layouts.loha(model, spelling="ldm", dtype=BF16, few=True),
             "mult_fu": layouts.full(model, dtype=F32, few=True),
             "mult_do": layouts.dora(model, dtype=F32, few=True)}
    concepts = {name: read_concept(f.save(lora_dir(), name)) for name, f in files.items()}
    for name, c in concepts.items():
        for spec, te, unet in (("0.5:0.8", 0.5, 0.8), ("te=-0.75:unet=1.5", -0.75, 1.5)):
            assert_applies_as(model, [(c, unet, te)], host_applies(lora_host, f"<lora:{name}:{spec}>"),
                              f"{name} at {spec}")
    stacked = host_applies(lora_host, "<lora:mult_lo:0.5:0.8> <lora:mult_fu:1:0.3> <lora:mult_do:1.2:0.7>")
    assert_applies_as(model, [(concepts["mult_lo"], 0.8, 0.5), (concepts["mult_fu"], 0.3, 1.0),
                              (concepts["mult_do"], 0.7, 1.2)], stacked, "three files stacked")


# ---------------------------------------------------------------------------------- trigger words
@pytest.fixture(scope="module")
def tiny_lora(model) -> layouts.LoraFile:
    return layouts.kohya_lora(model, dtype=F16, few=True)


def _save(tiny_lora: layouts.LoraFile, folder: Path, name: str = "dog", tags: dict | None = None,
          meta: bool = True) -> Path:
    metadata = layouts.kohya_metadata(tags=tags) if meta else {}
    return layouts.LoraFile(tiny_lora.tensors, metadata).save(folder, name)


def test_trigger_words_given_then_sidecar_then_tags(tiny_lora, tmp_path):
    path = _save(tiny_lora, tmp_path)
    by_tags = read_concept(path)
    assert by_tags.triggers == ("ohwx dog",) and by_tags.tokens == ()
    assert "ss_tag_frequency" in by_tags.trigger_source and "12" in by_tags.trigger_source
    assert by_tags.prompt_words == "ohwx dog"

    layouts.write_sidecar(path, "  sks   man, red coat ")
    by_sidecar = read_concept(path)
    assert by_sidecar.triggers == ("sks man", "red coat")
    assert "dog.json" in by_sidecar.trigger_source and "activation text" in by_sidecar.trigger_source

    given = read_concept(path, trigger="zwx cat")
    assert given.triggers == ("zwx cat",) and given.trigger_source == "given"

    layouts.write_sidecar(path, "")  # an empty activation text falls through to the tags
    assert read_concept(path).triggers == ("ohwx dog",)


def test_most_frequent_tag_sums_folders_and_breaks_ties_alphabetically(tiny_lora, tmp_path):
    summed = {"10_sks cat": {"sks cat": 5, "grass": 4}, "3_reg": {"grass": 2, "sky": 1}}
    assert read_concept(_save(tiny_lora, tmp_path, "a", summed)).triggers == ("grass",)
    tie = {"1_x": {"zeta": 4, "alpha one": 4, "mid": 4}, "1_y": {"beta": 3}}
    assert read_concept(_save(tiny_lora, tmp_path, "b", tie)).triggers == ("alpha one",)


@pytest.mark.parametrize("meta", [False, True])
def test_a_lora_without_trigger_words_is_refused_naming_it(tiny_lora, tmp_path, meta):
    path = _save(tiny_lora, tmp_path, "nameless", tags={"10_x": {}}, meta=meta)
    with pytest.raises(ConceptError, match=r"nameless\.safetensors.*trigger"):
        read_concept(path)


def test_our_format_keeps_the_trigger_words(tiny_lora, tmp_path):
    path = _save(tiny_lora, tmp_path)
    layouts.write_sidecar(path, "sks man, red coat")
    written = write_concept(read_concept(path), tmp_path / "out" / "ours.safetensors")
    with safe_open(str(written), "pt") as f:
        meta = json.loads(f.metadata()["mos_concept"])
    assert meta["version"] == 3 and meta["family"] == "sd1" and meta["triggers"] == ["sks man", "red coat"] and meta["tokens"] == []
    back = read_concept(written)
    assert back.triggers == ("sks man", "red coat") and back.trigger_source == "the file"
    assert read_concept(written, trigger="other").triggers == ("other",)


# --------------------------------------------------------------------------------------- bad input
Tensors = dict[str, torch.Tensor]
Edit = Callable[[Tensors, dict[str, str]], None]
Q0 = ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q")  # 32 x 32, no bias
CONV1 = ("unet", "input_blocks.1.0.in_layers.2")  # 3x3, 32 -> 32
PROJ_IN = ("unet", "input_blocks.1.1.proj_in")  # 1x1
KQ0, KCONV1, KPROJ = (layouts.key_stem(layer, "diffusers") for layer in (Q0, CONV1, PROJ_IN))
GOOD: dict[str, Build] = {  # small good files of each kind, diffusers keys, to break
    "lora": lambda m: layouts.kohya_lora(m, dtype=F16, few=True),
    "locon": lambda m: layouts.kohya_locon(m, few=True),
    "tucker": lambda m: layouts.kohya_locon(m, tucker=True, few=True),
    "loha": lambda m: layouts.loha(m, dtype=BF16, few=True),
    "lokr": lambda m: layouts.lokr(m, few=True),
    "full": lambda m: layouts.full(m, few=True),
    "dora": lambda m: layouts.dora(m, few=True),
}
Z = torch.zeros


def put(key: str, value: torch.Tensor) -> Edit:
    return lambda t, meta: t.update({key: value})


def drop(key: str) -> Edit:
    return lambda t, meta: t.pop(key)


def nan(key: str, value: float = float("nan")) -> Edit:
    def edit(t: Tensors, meta: dict[str, str]) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value
    return edit


def layer(stem: str, **parts: torch.Tensor) -> Edit:
    """Add a layer's parts (`lora_down__weight` for `lora_down.weight`)."""
    return lambda t, meta: t.update({f"{stem}.{p.replace('__', '.')}": v for p, v in parts.items()})


def both(*edits: Edit) -> Edit:
    def edit(t: Tensors, meta: dict[str, str]) -> None:
        for one in edits:
            one(t, meta)
    return edit


def metadata(**values: str) -> Edit:
    return lambda t, meta: meta.update(values)


def sdxl_text_encoders(t: Tensors, meta: dict[str, str]) -> None:
    """An SDXL file's text-encoder keys: lora_te1_ (whose layers SD1 has) and lora_te2_."""
    for key in [k for k in t if k.startswith("lora_te_")]:
        t[key.replace("lora_te_", "lora_te1_")] = t.pop(key)
    layer("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", lora_down__weight=Z(4, 1280),
          lora_up__weight=Z(1280, 4))(t, meta)


SDXL_Q = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"  # SDXL has 2+ blocks there
BAD_FILES: dict[str, tuple[str, Edit, list[str]]] = {  # (good file, edit, what the message names)
    "SDXL: lora_te1_ and lora_te2_ keys": ("lora", sdxl_text_encoders,
                                           ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "SDXL"]),
    "SDXL: ss_base_model_version": ("lora", metadata(ss_base_model_version="sdxl_base_v1-0"),
                                    ["ss_base_model_version", "SDXL"]),
    "SD2: ss_v2": ("lora", metadata(ss_v2="True"), ["ss_v2", "SD2"]),
    "SDXL UNet layer": ("lora", layer(SDXL_Q, lora_down__weight=Z(4, 64), lora_up__weight=Z(64, 4)),
                        [f"{SDXL_Q}.lora", "SDXL"]),
    "a layer SD1 lacks (down_blocks 3 has no attention)": (
        "lora", layer("lora_unet_down_blocks_3_attentions_0_proj_in", lora_down__weight=Z(4, 128, 1, 1),
                      lora_up__weight=Z(128, 4, 1, 1)),
        ["lora_unet_down_blocks_3_attentions_0_proj_in.lora", "matches no layer"]),
    "IA3 layer": ("lora", layer(KPROJ, weight=torch.ones(32), on_input=torch.tensor(False)), [f"{KPROJ}.on_input", "IA3"]),
    "Norm layer": ("locon", layer("lora_unet_down_blocks_0_resnets_0_norm1", w_norm=torch.ones(32), b_norm=Z(32)),
                   ["lora_unet_down_blocks_0_resnets_0_norm1.", "Norm"]),
    "OFT layer": ("locon", layer(KCONV1, oft_blocks=Z(4, 8, 8)), [f"{KCONV1}.oft_blocks", "OFT"]),
    "LoRA ranks differ": ("lora", put(f"{KQ0}.lora_up.weight", Z(32, 3, dtype=F16)),
                          [f"{KQ0}.lora_up.weight", "ranks do not match"]),
    "LoCon conv factors do not multiply": ("locon", put(f"{KCONV1}.lora_up.weight", Z(32, 3, 1, 1)),
                                           [KCONV1, "do not multiply"]),
    "Tucker core of another rank": ("tucker", put(f"{KCONV1}.lora_mid.weight", Z(3, 3, 3, 3)),
                                    [KCONV1, "do not multiply"]),
    "LoHa factors do not multiply": ("loha", put(f"{KQ0}.hada_w2_b", Z(3, 32)), [KQ0, "do not multiply"]),
    "LoKr factors do not multiply": ("lokr", put(f"{KQ0}.lokr_w1_b", Z(3, 4)), [KQ0, "do not multiply"]),
    "LoRA up without down": ("lora", drop(f"{KQ0}.lora_down.weight"),
                             [f"{KQ0}.lora_up.weight", "down weight is missing"]),
    "LoCon down without up": ("locon", drop(f"{KCONV1}.lora_up.weight"),
                              [f"{KCONV1}.lora_down.weight", "up weight is missing"]),
    "LoHa without hada_w2_b": ("loha", drop(f"{KQ0}.hada_w2_b"), [f"{KQ0}.", "no LoRA kind"]),
    "a LoHa part on a LoRA layer": ("lora", put(f"{KQ0}.hada_w1_a", Z(32, 4)), [f"{KQ0}.hada_w1_a", "does not belong"]),
    "NaN in a LoRA factor": ("lora", nan(f"{KQ0}.lora_up.weight"), [f"{KQ0}.lora_up.weight", "NaN"]),
    "NaN in alpha": ("lora", nan(f"{KQ0}.alpha"), [f"{KQ0}.alpha", "NaN"]),
    "NaN in a LoHa part": ("loha", nan(f"{KCONV1}.hada_w1_a"), [f"{KCONV1}.hada_w1_a", "NaN"]),
    "NaN in a Tucker core": ("tucker", nan(f"{KCONV1}.lora_mid.weight"), [f"{KCONV1}.lora_mid.weight", "NaN"]),
    "Inf in a full diff_b": ("full", nan(f"{KCONV1}.diff_b", float("inf")), [f"{KCONV1}.diff_b", "Inf"]),
    "NaN in dora_scale": ("dora", nan(f"{KQ0}.dora_scale"), [f"{KQ0}.dora_scale", "NaN"]),
}


def broken(model: sd1.SD1Model, good: str, edit: Edit) -> layouts.LoraFile:
    file = GOOD[good](model)
    edit(file.tensors, file.metadata)
    return file


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_concept_error_naming_file_and_key(model, tmp_path, case):
    good, edit, needles = BAD_FILES[case]
    path = broken(model, good, edit).save(tmp_path, "broken")
    with pytest.raises(ConceptError) as exc:
        read_concept(path)
    message = str(exc.value)
    assert "broken.safetensors" in message and "\n" not in message
    for needle in needles:
        assert needle in message


# Changes that read fine but are shaped for another model: check_against_model names the layer.
MISFITS: dict[str, tuple[str, Edit, tuple[str, str]]] = {
    "LoRA 48 wide on a 32-wide linear": ("lora", put(f"{KQ0}.lora_down.weight", Z(4, 48, dtype=F16)), Q0),
    "LoCon 3x3 down on a 1x1 conv": ("lora", put(f"{KPROJ}.lora_down.weight", Z(4, 32, 3, 3)), PROJ_IN),
    "LoCon conv with the wrong input channels": ("locon", put(f"{KCONV1}.lora_down.weight", Z(2, 64, 3, 3)), CONV1),
    "LoHa product of another shape": ("loha", both(put(f"{KQ0}.hada_w1_a", Z(64, 4)), put(f"{KQ0}.hada_w2_a", Z(64, 4))),
                                      Q0),
    "full diff of another shape": ("full", put(f"{KCONV1}.diff", Z(32, 32, 1, 1)), CONV1),
    "full diff_b on a layer without bias": ("full", put(f"{KQ0}.diff_b", Z(32)), Q0),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_changes_that_do_not_fit_the_model_are_refused_naming_the_layer(model, tmp_path, case):
    good, edit, (_, name) = MISFITS[case]
    concept = read_concept(broken(model, good, edit).save(tmp_path, "misfit"))
    with pytest.raises(ConceptError) as exc:
        check_against_model(concept, model)
    assert "misfit.safetensors" in str(exc.value) and repr(name) in str(exc.value)
    before = snapshot(model.unet, model.text_encoder)
    with pytest.raises(ConceptError), applied([(concept, 1.0, 1.0)], model.unet, model.text_encoder):
        pass
    assert_same(snapshot(model.unet, model.text_encoder, clone=False), before, "applied() checks before changing")


# ----------------------------------------------------------------------------------- atomic writes
def test_write_concept_leaves_nothing_behind_on_error(model, tmp_path, monkeypatch):
    from lib_mos import tensorfile

    concept = read_concept(layouts.loha(model, dtype=BF16, tucker=True, few=True).save(tmp_path, "src"))
    out = tmp_path / "out"
    out.mkdir()

    def listing() -> list[str]:
        return sorted(p.name for p in out.iterdir())

    existing = out / "taken.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConceptError, match=r"taken\.safetensors.*already exists"):
        write_concept(concept, existing)
    assert existing.read_bytes() == b"keep me" and listing() == ["taken.safetensors"]

    def with_parts(**change: torch.Tensor | None) -> Concept:  # a concept built in code
        delta = concept.unet_lora[Q0[1]]
        parts = {k: v for k, v in ({**delta.parts, **change}).items() if v is not None}
        return dataclasses.replace(concept, unet_lora={**concept.unet_lora, Q0[1]: ModuleDelta(delta.kind, parts)})

    nan = concept.unet_lora[Q0[1]].parts["hada_w1_a"].clone()
    nan[0, 0] = float("nan")
    for bad, needle in ((dataclasses.replace(concept, triggers=()), "tokens or trigger words"),
                        (dataclasses.replace(concept, text_lora={"text_model.no_such.fc1": concept.unet_lora[Q0[1]]}),
                         "no_such"),
                        (with_parts(hada_w1_a=nan), rf"{Q0[1]}\.hada_w1_a.*NaN"),
                        (with_parts(hada_w2_b=None), rf"{Q0[1]}\..*no LoRA kind")):
        with pytest.raises(ConceptError, match=needle):
            write_concept(bad, out / "bad.safetensors")
        assert listing() == ["taken.safetensors"]

    real_write = tensorfile.write_tensor
    written_some: list[int] = []

    def half_then_fail(dst, tensor):  # the disk fills after the first tensors
        if len(written_some) == 3:
            raise OSError(28, "No space left on device")
        written_some.append(real_write(dst, tensor))
        return written_some[-1]

    monkeypatch.setattr(tensorfile, "write_tensor", half_then_fail)
    with pytest.raises(ConceptError, match=r"full\.safetensors.*cannot write.*No space"):
        write_concept(concept, out / "full.safetensors")
    assert listing() == ["taken.safetensors"]
    monkeypatch.undo()
    written = write_concept(concept, out / "full.safetensors")
    assert listing() == ["full.safetensors", "taken.safetensors"]
    assert load_file(str(written)).keys() >= {f"{KQ0}.hada_w1_a"}
