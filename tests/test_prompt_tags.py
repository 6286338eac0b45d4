"""The one parser of the host's extra-network tags (lib_mos.prompt_tags): it finds and strips what
the host's `modules/extra_networks.parse_prompt` finds and strips (the double copies the host's
pattern), and its three users keep their rules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lib_mos.prompt_tags import ExtraNetworkTag, extra_network_tags, replace_extra_network_tags
from lib_mos.regional.loras import global_lora_names
from lib_mos.regional.regions import LoraRef, RegionError, split_lora_tags
from modules import extra_networks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import mos_host_binding

ACCEPTED = {
    "<lora:a:0.5>": [("lora", ("a", "0.5"))],
    "<lora:a:0.5:0.2>": [("lora", ("a", "0.5", "0.2"))],
    "<lyco:b>": [("lyco", ("b",))],
    "<lora:my lora v1.5-final_2:0.8>": [("lora", ("my lora v1.5-final_2", "0.8"))],
    "<lora:a:te=0.5:unet=1>": [("lora", ("a", "te=0.5", "unet=1"))],
    "<hypernet:h.pt:0.3>": [("hypernet", ("h.pt", "0.3"))],
    "<lora::1>": [("lora", ("", "1"))],  # the host finds it (and then finds no LoRA named "")
    "a <lora:a:1> b<hypernet:h>, <lyco:x.y-z:0.5> c": [("lora", ("a", "1")), ("hypernet", ("h",)),
                                                        ("lyco", ("x.y-z", "0.5"))],
    # an unclosed tag swallows the next one, in the host's scan as here
    "<hypernet:x <lora:a:1>": [("hypernet", ("x <lora", "a", "1"))],
}
NOT_TAGS = ["<cat1>", "<lora:>", "<:a>", "<lo-ra:a>", "<lora a:1>", "lora:a:1", "<lora:a", "< lora:a>"]


@pytest.mark.parametrize("text", list(ACCEPTED))
def test_the_tags_the_host_accepts(text):
    found = extra_network_tags(text)
    assert [(t.kind, t.args) for t in found] == ACCEPTED[text]
    stripped, data = extra_networks.parse_prompt(text)
    assert replace_extra_network_tags(text) == stripped
    assert {k: [p.items for p in v] for k, v in data.items()} == \
        {kind: [list(t.args) for t in found if t.kind == kind] for kind in {t.kind for t in found}}


@pytest.mark.parametrize("text", NOT_TAGS)
def test_what_is_no_tag(text):
    assert extra_network_tags(text) == []
    assert replace_extra_network_tags(text) == text == extra_networks.parse_prompt(text)[0]


def test_replacements():
    assert extra_network_tags("x <lyco:b:1> y")[0] == ExtraNetworkTag("<lyco:b:1>", "lyco", ("b", "1"))
    assert extra_network_tags("<lyco:b>")[0].is_lora and not extra_network_tags("<hypernet:b>")[0].is_lora
    assert replace_extra_network_tags("<x<lora:a:1>1>", " ") == "<x 1>"  # never joins text into a token
    assert replace_extra_network_tags("a<lora:a>b", r"\1") == r"a\1b"  # a plain string, no group references
    assert replace_extra_network_tags("<lora:a:1> and <lyco:b>", lambda t: t.args[0].upper()) == "A and B"


def test_its_users_keep_their_rules():
    # the regions: LoRA tags only, one weight; taken out of the region's prompt
    assert split_lora_tags("a <lyco:cat v1.5:0.5> cat") == ("a  cat", (LoraRef("cat v1.5", 0.5),))
    with pytest.raises(RegionError, match="only <lora:name:weight> tags"):
        split_lora_tags("a <hypernet:h> cat")
    with pytest.raises(RegionError, match="one weight"):
        split_lora_tags("<lora:a:0.5:0.2>")
    # the LoRAs the host applies to the whole image: names stripped, empty names and other kinds dropped
    assert global_lora_names(["<lora: cat :0.6>, <lyco:x.y-z>", "<hypernet:h> <lora::1> <hypernet:x <lora:no:1>"]) \
        == {"cat", "x.y-z"}
    # concept tokens: a tag is never one, and text on both sides of a tag is not joined
    assert mos_host_binding.concept_tokens_mentioned(["<x1> <lora:x2:1> <a<lora:b>1>", "<y1>,<hypernet:z>"]) \
        == {"<x1>", "<y1>"}
