"""The command line with LoRAs that are concepts by their trigger words: `convert --trigger` and
the line saying which words were chosen and where from, the `--concept` grammar with trigger words
(`FILE[:<new1>+<new2>][#trigger words][@UNET,TEXT]`), and `fuse --templates`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import ConceptError, unet_ldm_to_diffusers
from lib_mos.concepts.files import read_concept, write_concept
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion.checkpoint import ConceptSpec, parse_concept_spec
from lib_mos.models import sd1


@functools.cache
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1()


def write_kohya_lora(path: Path, *, seed: int = 3, metadata: dict[str, str] | None = None,
                     activation_text: str | None = None) -> Path:
    """A kohya-trainer LoRA of the tiny model without our metadata: `lora_unet_<diffusers path>`
    (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, ...)
    and `lora_te_text_model_...` keys with `.lora_down.weight` / `.lora_up.weight` / `.alpha`, on
    every attention linear; with the host's sidecar `<file>.json` when `activation_text` is given."""
    concept = synthetic.random_concept(tiny(), ("<x>",), seed=seed, rank=2)
    tensors: dict[str, torch.Tensor] = {}
    for kind, lora in (("unet", concept.unet_lora), ("te", concept.text_lora)):
        for name, f in lora.items():
            stem = f"lora_{kind}_" + (unet_ldm_to_diffusers(name) if kind == "unet" else name).replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = f.down
            tensors[f"{stem}.lora_up.weight"] = f.up
            tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", **(metadata or {})})
    if activation_text is not None:
        path.with_suffix(".json").write_text(json.dumps({"description": "", "activation text": activation_text}))
    return path


def tag_frequency(**folders: dict[str, int]) -> dict[str, str]:
    return {"ss_tag_frequency": json.dumps(folders)}


# ------------------------------------------------------------------------------- --concept grammar
@pytest.mark.parametrize(("spec", "expected"), [
    ("lora.safetensors", ConceptSpec("lora.safetensors", None, 0.7, 0.9)),
    ("lora.safetensors#ohwx man", ConceptSpec("lora.safetensors", None, 0.7, 0.9, "ohwx man")),
    ("dir/lora.safetensors# ohwx man, red coat @0.5,0.25",
     ConceptSpec("dir/lora.safetensors", None, 0.5, 0.25, "ohwx man, red coat")),
    # '@' and '#' inside the words; the weights are the last '@' with two numbers
    ("lora.pt#me@home, #1 fan@1e-1,2", ConceptSpec("lora.pt", None, 0.1, 2.0, "me@home, #1 fan")),
    ("lora.safetensors#a@1,2@0.3,0.4", ConceptSpec("lora.safetensors", None, 0.3, 0.4, "a@1,2")),
    ("lora.safetensors#not@weights", ConceptSpec("lora.safetensors", None, 0.7, 0.9, "not@weights")),
    # '#' is part of the path unless it follows the file's suffix
    ("char#2.safetensors", ConceptSpec("char#2.safetensors", None, 0.7, 0.9)),
    ("my#loras/char#2.SafeTensors#sks dog@1,1", ConceptSpec("my#loras/char#2.SafeTensors", None, 1.0, 1.0, "sks dog")),
    ("folder.pt/x.ckpt#w:1", ConceptSpec("folder.pt/x.ckpt", None, 0.7, 0.9, "w:1")),
    (r"C:\loras\hero.pth#ohwx man@0.8,1", ConceptSpec(r"C:\loras\hero.pth", None, 0.8, 1.0, "ohwx man")),
    # the renaming and Windows drive letters as before
    (r"C:\c\cat.safetensors:<a>+<b>@2,3", ConceptSpec(r"C:\c\cat.safetensors", ("<a>", "<b>"), 2.0, 3.0)),
    ("cat.safetensors:<a>+<b>#words", ConceptSpec("cat.safetensors", ("<a>", "<b>"), 0.7, 0.9, "words")),
    ("noext#words", ConceptSpec("noext#words", None, 0.7, 0.9)),
])
def test_concept_spec_grammar(spec, expected):
    assert parse_concept_spec(spec, 0.7, 0.9) == expected


@pytest.mark.parametrize("spec", ["lora.safetensors#", "lora.safetensors#  @1,1", "lora.safetensors#, ,"])
def test_empty_trigger_words_are_refused(spec):
    with pytest.raises(ConceptError, match="empty trigger words") as exc:
        parse_concept_spec(spec)
    assert "lora.safetensors" in str(exc.value)


def test_load_inputs_reads_with_the_specs_trigger_words(tmp_path):
    lora = write_kohya_lora(tmp_path / "hero.safetensors", metadata=tag_frequency(a={"1girl": 9}))
    cat = write_concept(synthetic.random_concept(tiny(), ("<cat1>",), seed=1), tmp_path / "cat.safetensors")
    inputs = fused_checkpoint.load_inputs([parse_concept_spec(f"{lora}#ohwx man, red coat@0.5,1"),
                                           parse_concept_spec(str(cat))])
    hero = inputs[0].concept
    assert (hero.tokens, hero.triggers, hero.trigger_source) == ((), ("ohwx man", "red coat"), "given")
    assert (inputs[0].unet_weight, inputs[0].text_weight) == (0.5, 1.0)
    assert fused_checkpoint.load_inputs([parse_concept_spec(str(lora))])[0].concept.triggers == ("1girl",)
    with pytest.raises(ConceptError, match="no tokens to rename"):
        fused_checkpoint.load_inputs([parse_concept_spec(f"{lora}:<a>")])
    with pytest.raises(ConceptError, match="trigger words"):  # a concept with tokens takes none
        fused_checkpoint.load_inputs([parse_concept_spec(f"{cat}#ohwx man")])


# ---------------------------------------------------------------------------------------- convert
def test_convert_names_the_trigger_words_and_where_they_came_from(tmp_path, capsys):
    from lib_mos.cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    tagged = write_kohya_lora(tmp_path / "tagged.safetensors",
                              metadata=tag_frequency(**{"10_hero": {"ohwx man": 5, "beard": 2},
                                                        "5_reg": {"man": 4, "beard": 2}}))
    assert main(["convert", str(tagged), str(out / "a.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f'{tagged}: trigger words "ohwx man" from most frequent training tag (5 times in '
                        "ss_tag_frequency); pass --trigger to choose others")
    assert lines[1].startswith(f"wrote {out / 'a.safetensors'}: SD1.x concept 'tagged', trigger words ohwx man, rank 2")
    written = read_concept(out / "a.safetensors")
    assert (written.tokens, written.triggers) == ((), ("ohwx man",))

    assert main(["convert", str(tagged), str(out / "b.safetensors"), "--trigger", " sks  person , red coat"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f'{tagged}: trigger words "sks person", "red coat" as given'
    assert read_concept(out / "b.safetensors").triggers == ("sks person", "red coat")

    sidecar = write_kohya_lora(tmp_path / "side.safetensors", activation_text="zwx dog",
                               metadata=tag_frequency(a={"dog": 50}))
    assert main(["convert", str(sidecar), str(out / "c.safetensors")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (f'{sidecar}: trigger words "zwx dog" from activation text of '
                                                       "side.json; pass --trigger to choose others")
    assert read_concept(out / "c.safetensors").triggers == ("zwx dog",)


def test_convert_refuses_trigger_with_embedding_and_a_lora_without_words(tmp_path, capsys):
    from lib_mos.cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    bare = write_kohya_lora(tmp_path / "bare.safetensors")
    emb = tmp_path / "hero_embedding.safetensors"
    save_file({"emb_params": torch.randn(1, tiny().config.context_dim)}, str(emb))
    assert main(["convert", str(bare), str(out / "a.safetensors"), "--trigger", "ohwx", "--embedding", str(emb)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --trigger and --embedding") and "one or the other" in err[0]
    assert main(["convert", str(bare), str(out / "b.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bare.safetensors" in err[0] and "--trigger" in err[0]
    assert list(out.iterdir()) == []
    assert main(["convert", str(bare), str(out / "c.safetensors"), "--embedding", str(emb)]) == 0
    assert read_concept(out / "c.safetensors").tokens == ("<hero_embedding>",)


# ------------------------------------------------------------------------------------------- fuse
class Stop(ConceptError):
    pass


@pytest.fixture
def fuse_calls(monkeypatch, capsys):
    """fuse_checkpoint replaced: records its specs and settings and what was printed before it."""
    calls = []

    def fake(base, specs, out, settings, **kwargs):
        calls.append({"specs": list(specs), "settings": settings, "printed": capsys.readouterr().out})
        raise Stop("stopped by the test")

    monkeypatch.setattr(fused_checkpoint, "fuse_checkpoint", fake)
    return calls


def test_fuse_says_which_trigger_words_each_lora_uses_before_it_starts(tmp_path, fuse_calls, capsys):
    from lib_mos.cli.main import main

    cat = write_concept(synthetic.random_concept(tiny(), ("<cat1>",), seed=1), tmp_path / "cat.safetensors")
    tagged = write_kohya_lora(tmp_path / "tagged.safetensors", metadata=tag_frequency(a={"watercolor style": 3}))
    given = write_kohya_lora(tmp_path / "given.safetensors", seed=4, activation_text="not this")
    argv = ["fuse", "--base", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "f.safetensors"),
            "--concept", str(cat), "--concept", f"{tagged}@0.5,1", "--concept", f"{given}#ohwx man, blue hat@1,0.5"]
    assert main(argv) == 1 and "stopped by the test" in capsys.readouterr().err
    call = fuse_calls[0]
    assert call["printed"].splitlines() == [
        f'{tagged}: trigger words "watercolor style" from most frequent training tag (3 times in ss_tag_frequency); '
        "add #WORDS to its --concept to choose others",
        f'{given}: trigger words "ohwx man", "blue hat" as given']
    specs = call["specs"]
    assert [(s.path, s.trigger, s.unet_weight, s.text_weight) for s in specs] == [
        (str(cat), None, 1.0, 1.0), (str(tagged), None, 0.5, 1.0), (str(given), "ohwx man, blue hat", 1.0, 0.5)]
    assert [s.concept.prompt_words for s in specs] == ["<cat1>", "watercolor style", "ohwx man, blue hat"]
    assert call["settings"].templates is None

    assert main([*argv, "--progress", "jsonl"]) == 1  # a parent reads JSON lines
    notes = [json.loads(line) for line in fuse_calls[1]["printed"].splitlines()]
    assert [n["note"].split(": trigger words")[0] for n in notes] == [str(tagged), str(given)]


def test_fuse_templates(tmp_path, fuse_calls, capsys):
    from lib_mos.cli.main import main

    cat = write_concept(synthetic.random_concept(tiny(), ("<cat1>",), seed=1), tmp_path / "cat.safetensors")
    argv = ["fuse", "--base", str(tmp_path / "base.safetensors"), "--concept", str(cat),
            "--out", str(tmp_path / "f.safetensors")]
    assert main([*argv, "--templates", "photo of a {}; {} in the snow ;{}, watercolor"]) == 1
    assert fuse_calls[-1]["settings"].templates == ("photo of a {}", "{} in the snow", "{}, watercolor")
    capsys.readouterr()
    for templates, named in [("photo of a cat;{}", "'photo of a cat' has no {}"), ("{} and {}", "'{} and {}' has 2 {}"),
                             ("photo of a {};", "'' has no {}"), ("", "'' has no {}")]:
        assert main([*argv, "--templates", templates]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --templates: ") and named in err[0], err
    assert len(fuse_calls) == 1  # nothing started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.safetensors"]
