"""Extra-network prompt tags (modules/extra_networks.py): `<lora:name:1>` is stripped from the
prompts; the double records activations instead of applying networks."""

from __future__ import annotations

import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")

activations: list[dict] = []
"""Each call of `activate` appends the data it got (tests read this)."""


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [x for x in self.items if "=" not in x]
        self.named = dict(x.split("=", 1) for x in self.items if "=" in x)


def parse_prompt(prompt: str):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def activate(p, extra_network_data) -> None:
    activations.append(dict(extra_network_data or {}))
