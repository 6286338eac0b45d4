"""`--help` that names defaults, for every command line of the package (`lib_mos.cli`, the toy
world's); a module of its own so that neither imports the other for it."""

from __future__ import annotations

import argparse
import copy


class HelpWithDefaults(argparse.HelpFormatter):
    """`--help` names every option's default, also where the option has no help text (argparse's
    own ArgumentDefaultsHelpFormatter only adds it to options that have one); help that already
    speaks of its default, flags (default off), empty lists and None are left as they are."""

    @staticmethod
    def _names_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (
            default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default == [])

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and self._names_default(action):
            action = copy.copy(action)  # the parser's own action keeps its (absent) help
            action.help = "default: %(default)s"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._names_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"
