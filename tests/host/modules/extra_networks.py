"""Extra networks (modules/extra_networks.py): `<name:arg1:arg2>` tags are stripped from the prompts
and handed to the ExtraNetwork registered under that name (or alias): `activate` calls each mentioned
network with its params, then every other registered network with an empty list (which turns it
off), then the scripts' `after_extra_networks_activate`; `deactivate` runs after the batches.
An error in a network is reported, not raised. The host's `hypernet` network is not registered here:
its tags are skipped as unknown (see tests/host/README.md).

`activations` (double only) records the data each `activate` call got, for tests."""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from modules import errors

extra_network_registry: dict = {}
extra_network_aliases: dict = {}

activations: list[dict] = []
"""Each call of `activate` appends the data it got (tests read this)."""


def initialize() -> None:
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network) -> None:
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias) -> None:
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks() -> None:
    """The host registers its hypernetwork handler here; the double has none."""


class ExtraNetworkParams:
    """`items` split at `:`; an item with exactly one `=` is named (`te=0.5`), others are positional."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data) -> dict:
    """{ExtraNetwork: [params...]} for the names in `extra_network_data`; unknown names are skipped."""
    res: dict = {}
    for name, args in list(extra_network_data.items()):
        extra_network = extra_network_registry.get(name)
        alias = extra_network_aliases.get(name)
        if alias is not None and extra_network is None:
            extra_network = alias
        if extra_network is None:
            logging.info(f"Skipping unknown extra network: {name}")
            continue
        res.setdefault(extra_network, []).extend(args)
    return res


def activate(p, extra_network_data) -> None:
    activations.append(dict(extra_network_data or {}))
    activated = []
    for extra_network, args in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, args)
            activated.append(extra_network)
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network.name} with arguments {args}")
    for name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data) -> None:
    data = lookup_extra_networks(extra_network_data)
    for extra_network in data:
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {extra_network.name}")
    for name, extra_network in extra_network_registry.items():
        if extra_network in data:
            continue
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating unmentioned extra network {name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt: str):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    """Tags stripped from every prompt; the extra-network data is the first prompt's only."""
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
