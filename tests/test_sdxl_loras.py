"""SDXL LoRA files: read as the host resolves their keys (te1, te2, UNet in both spellings), the
wrong family refused by name before anything runs, and trigger-word concepts written and read back."""

from __future__ import annotations

import json
import re

import lora_layouts as layouts
import pytest
import torch
from safetensors import safe_open

from lib_mos.cli.main import main as cli
from lib_mos.concepts.concept import ConceptError, layer_change
from lib_mos.concepts.files import family_of_file, read_concept, write_concept
from lib_mos.models import sd1, sdxl
from lib_mos.models.family import SD1, SDXL


@pytest.fixture(scope="module")
def xl() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(seed=0)


def test_keys_reach_the_layers_the_host_changes(xl, tmp_path):
    """te1 -> "0." (CLIP-L), te2 -> "1." (bigG), UNet keys in ldm and diffusers spelling -> ldm names;
    each change is the file's up @ down * alpha / rank on exactly that layer."""
    for spelling in ("ldm", "diffusers"):
        lora = layouts.kohya_lora(xl, spelling=spelling, dtype=torch.float32, few=True, seed=3)
        concept = read_concept(lora.save(tmp_path, spelling), trigger="", family=SDXL)
        assert concept.family is SDXL
        assert {name for kind, name in lora.layers if kind == "text"} == set(concept.text_lora)
        assert {name for kind, name in lora.layers if kind == "unet"} == set(concept.unet_lora)
        stem = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
        factor = concept.text_lora["1.text_model.encoder.layers.0.mlp.fc1"]
        want = lora.tensors[f"{stem}.lora_up.weight"] @ lora.tensors[f"{stem}.lora_down.weight"] * (2.0 / 4)
        torch.testing.assert_close(factor.delta(), want)
        assert factor.delta().shape == xl.text_root.get_submodule("1.text_model.encoder.layers.0.mlp.fc1").weight.shape
        stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        factor = concept.text_lora["0.text_model.encoder.layers.0.self_attn.q_proj"]
        want = lora.tensors[f"{stem}.lora_up.weight"] @ lora.tensors[f"{stem}.lora_down.weight"] * (2.0 / 4)
        torch.testing.assert_close(factor.delta(), want)
        assert "middle_block.1.transformer_blocks.9.attn2.to_k" in concept.unet_lora


def test_a_full_size_sdxl_loras_keys_all_resolve(tmp_path):
    """Found in the real WebUI: the key table must know SDXL base's 12 CLIP-L and 32 bigG layers,
    not the tiny model's 2 (a LoRA for the real model was refused at 'layers_11')."""
    skeleton = sdxl.build_sdxl_skeleton()
    lora = layouts.kohya_lora(skeleton, few=True)
    concept = read_concept(lora.save(tmp_path, "full"), trigger="", family=SDXL)
    assert {"0.text_model.encoder.layers.11.mlp.fc1", "1.text_model.encoder.layers.11.self_attn.q_proj"} \
        <= set(concept.text_lora)
    last = {"lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_down.weight": torch.zeros(4, 5120),
            "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight": torch.zeros(1280, 4)}
    assert set(read_concept(layouts.LoraFile(last).save(tmp_path, "last"), trigger="", family=SDXL).text_lora) \
        == {"1.text_model.encoder.layers.31.mlp.fc2"}


def sd1_lora_keys_on(model, **kw) -> layouts.LoraFile:
    return layouts.kohya_lora(model, dtype=torch.float32, few=True, **kw)


@pytest.mark.parametrize(("case", "family", "message"), [
    ("SD1 LoRA on SDXL", SDXL, "metadata 'ss_base_model_version'/'ss_v2' says this LoRA is for SD1.x; this is an SDXL model"),
    ("SD1 LoRA without metadata on SDXL", SDXL,
     "key 'lora_te_text_model_encoder_layers_0_mlp_fc1.alpha' belongs to an SD1 LoRA (one text encoder, 'lora_te_'); "
     "this is an SDXL model"),
    ("SDXL LoRA on SD1", SD1, "says this LoRA is for SDXL; this is an SD1.x model"),
    ("SDXL LoRA without metadata on SD1", SD1, "belongs to an SDXL LoRA (two text encoders); this is an SD1 model"),
    ("SD2 LoRA on SDXL", SDXL, "says this LoRA is for SD2.x; this is an SDXL model"),
    ("SD2 LoRA on SD1", SD1, "says this LoRA is for SD2.x; this is an SD1.x model"),
])
def test_a_file_for_another_family_is_refused_naming_file_and_key(xl, tiny, tmp_path, case, family, message):
    source = tiny if case.startswith(("SD1", "SD2")) else xl
    lora = sd1_lora_keys_on(source)
    if "without metadata" in case:
        lora = layouts.LoraFile(lora.tensors, {})
    if case.startswith("SD2"):
        lora = layouts.LoraFile(lora.tensors, {**lora.metadata, "ss_v2": "True"})
    path = lora.save(tmp_path, "x")
    with pytest.raises(ConceptError, match="^" + str(path).replace(".", r"\.") + ": ") as exc:
        read_concept(path, trigger="", family=family)
    assert message in str(exc.value)


def test_an_sd1_unet_key_on_sdxl_is_named_with_a_hint(tiny, tmp_path):
    """Only UNet keys, no metadata: the first key SDXL lacks is named, with what it suggests."""
    lora = sd1_lora_keys_on(tiny, spelling="diffusers")
    unet_only = {k: v for k, v in lora.tensors.items() if k.startswith("lora_unet_down_blocks_0")}
    path = layouts.LoraFile(unet_only).save(tmp_path, "sd1unet")
    with pytest.raises(ConceptError, match=r"key 'lora_unet_down_blocks_0_attentions_0_.*' matches no layer of an SDXL "
                                           r"model \(an SD1 LoRA\? .*\); the host would skip it"):
        read_concept(path, trigger="", family=SDXL)


def test_te2_attention_needs_q_k_v_and_out_together(xl, tmp_path):
    """The host applies te2's attention changes through the fused MultiheadAttention only when all
    four are present; a file with some of them would lose them silently there, so it is refused."""
    lora = layouts.kohya_lora(xl, dtype=torch.float32, few=True)
    partial = {k: v for k, v in lora.tensors.items() if "lora_te2_text_model_encoder_layers_0_self_attn_v_proj" not in k}
    path = layouts.LoraFile(partial, lora.metadata).save(tmp_path, "partial")
    with pytest.raises(ConceptError, match=r"te2 layer 'text_model.encoder.layers.0' has attention changes without v"):
        read_concept(path, trigger="", family=SDXL)


def test_the_first_upsampler_in_diffusers_spelling_is_refused_as_the_host_skips_it(xl, tmp_path):
    """The host converts `up_blocks_0_upsamplers_0_conv` with SD1's layout (output_blocks.2.1.conv),
    which on SDXL is no layer (there the upsampler follows the attention: output_blocks.2.2.conv)."""
    conv = xl.unet.get_submodule("output_blocks.2.2.conv")
    parts = layouts.lora_parts(conv.weight.shape, 2, torch.Generator().manual_seed(0))
    path = layouts.LoraFile({f"lora_unet_up_blocks_0_upsamplers_0_conv.{k}": v for k, v in parts.items()},
                            {"ss_base_model_version": "sdxl_base_v1-0"}).save(tmp_path, "up")
    with pytest.raises(ConceptError, match=re.escape("'lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight' matches no layer")):
        read_concept(path, trigger="", family=SDXL)
    ldm = layouts.LoraFile({f"lora_unet_output_blocks_2_2_conv.{k}": v for k, v in parts.items()},
                           {"ss_base_model_version": "sdxl_base_v1-0"}).save(tmp_path, "up-ldm")
    assert set(read_concept(ldm, trigger="", family=SDXL).unet_lora) == {"output_blocks.2.2.conv"}


@pytest.mark.parametrize("kind", ["kohya_lora", "kohya_locon", "loha", "lokr", "full", "dora"])
def test_trigger_word_concepts_round_trip_with_their_family(xl, tmp_path, kind):
    lora = getattr(layouts, kind)(xl, few=True)
    source = lora.save(tmp_path, "src")
    concept = read_concept(source, trigger="ohwx dog", family=SDXL)
    out = write_concept(concept, tmp_path / "concept.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert json.loads(meta["mos_concept"])["family"] == "sdxl" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_te1_") for k in keys)
    back = read_concept(out, family=SDXL)
    assert back.triggers == ("ohwx dog",) and back.family is SDXL
    assert set(back.unet_lora) == set(concept.unet_lora) and set(back.text_lora) == set(concept.text_lora)
    for name, delta in concept.text_lora.items():
        layer = xl.text_root.get_submodule(name)
        torch.testing.assert_close(layer_change(back.text_lora[name], layer.weight), layer_change(delta, layer.weight))
    with pytest.raises(ConceptError, match=re.escape("this concept is for SDXL; this is an SD1.x model")):
        read_concept(out)
    assert family_of_file(out) is SDXL and family_of_file(source) is SDXL


def test_family_of_file_reads_what_the_file_says_else_its_keys(xl, tiny, tmp_path):
    assert family_of_file(layouts.kohya_lora(tiny, few=True).save(tmp_path, "a")) is SD1
    bare = layouts.kohya_lora(xl, few=True)
    assert family_of_file(layouts.LoraFile(bare.tensors).save(tmp_path, "b")) is SDXL
    sd2 = layouts.LoraFile(bare.tensors, {"ss_base_model_version": "sd_v2_768_v"}).save(tmp_path, "c")
    with pytest.raises(ConceptError, match=re.escape("is for SD2.x, which is not supported")):
        family_of_file(sd2)


def test_convert_finds_the_family_and_says_it(xl, tmp_path, capsys):
    source = layouts.kohya_lora(xl, few=True).save(tmp_path, "xl")
    assert cli(["convert", str(source), str(tmp_path / "out.safetensors"), "--trigger", "ohwx cat"]) == 0
    assert "SDXL concept 'xl', trigger words ohwx cat" in capsys.readouterr().out
    assert read_concept(tmp_path / "out.safetensors", family=SDXL).family is SDXL
    assert cli(["convert", str(source), str(tmp_path / "bad.safetensors"), "--trigger", "x", "--family", "sd1"]) == 1
    assert "says this LoRA is for SDXL; this is an SD1.x model" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_an_old_version_2_file_reads_as_sd1(tiny, tmp_path):
    concept = read_concept(layouts.kohya_lora(tiny, few=True).save(tmp_path, "a"), trigger="ohwx")
    out = write_concept(concept, tmp_path / "new.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    info = json.loads(meta["mos_concept"])
    info["version"] = 2
    del info["family"]
    old = layouts.LoraFile(tensors, {**meta, "mos_concept": json.dumps(info)})
    old.metadata.pop("ss_base_model_version")
    path = old.save(tmp_path, "old")
    assert read_concept(path).family is SD1
    with pytest.raises(ConceptError, match=re.escape("this concept is for SD1.x; this is an SDXL model")):
        read_concept(path, family=SDXL)
