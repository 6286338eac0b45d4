"""The host's extra-network tags in a prompt (`<lora:name:1.0>`, `<lyco:name:0.5:0.2>`,
`<hypernet:name>`), found exactly as the WebUI finds them, so that what the extension reads from
a prompt, or takes out of it, is what the host applies and takes out.

The pattern is `re_extra_net` of the host's `modules/extra_networks.py` (A1111 v1.10.1), used
the same way: one left-to-right scan in which every `<word:...>` is a tag whatever its kind, so a
tag that a stray unclosed tag swallows is swallowed here too. The host splits the text after the
kind at every ':' into the tag's arguments; the built-in Lora extension takes the first as the
name and registers "lyco" as another name for "lora".

No WebUI import: the regional code and the host glue both use this.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LORA_KINDS", "ExtraNetworkTag", "extra_network_tags", "replace_extra_network_tags"]

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py: re_extra_net
LORA_KINDS = ("lora", "lyco")  # the built-in Lora registers "lyco" as an alias of "lora"


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One tag as the host reads it: `<kind:arg:arg...>`."""

    text: str  # the whole tag as written, for messages
    kind: str
    args: tuple[str, ...]  # the text after the kind split at every ':' (never empty; items may be)

    @property
    def is_lora(self) -> bool:
        """A tag the built-in Lora extension applies (`<lora:...>` or its alias `<lyco:...>`)."""
        return self.kind in LORA_KINDS


def _tag(match: re.Match[str]) -> ExtraNetworkTag:
    return ExtraNetworkTag(match.group(0), match.group(1), tuple(match.group(2).split(":")))


def extra_network_tags(text: str) -> list[ExtraNetworkTag]:
    """The tags of `text` in order, as the host finds them."""
    return [_tag(m) for m in _EXTRA_NETWORK_TAG.finditer(text)]


def replace_extra_network_tags(text: str, replacement: str | Callable[[ExtraNetworkTag], str] = "") -> str:
    """`text` with every tag replaced: by "" (the default), which is what the host leaves of a
    prompt, by another string, or by what `replacement(tag)` returns (which may raise to refuse a
    tag). A caller scanning for words passes " " so the text on both sides of a tag never joins
    into one word that the prompt does not hold."""
    if isinstance(replacement, str):
        return _EXTRA_NETWORK_TAG.sub(lambda _: replacement, text)
    return _EXTRA_NETWORK_TAG.sub(lambda m: replacement(_tag(m)), text)
