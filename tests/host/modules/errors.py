"""Error reporting of the host (modules/errors.py): `report` and `display` print and never raise.
The double also keeps every report in `reported` for tests."""

from __future__ import annotations

import sys
import traceback

reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    text = message + (f"\n{traceback.format_exc()}" if exc_info else "")
    reported.append(text)
    print(f"*** {text}", file=sys.stderr)


def display(e: Exception, task, *, full_traceback: bool = False) -> None:
    text = f"{task or 'error'}: {type(e).__name__}\n" + "".join(traceback.format_exception(e))
    reported.append(text)
    print(text, file=sys.stderr)


_displayed: set = set()


def display_once(e: Exception, task) -> None:
    if task in _displayed:
        return
    display(e, task)
    _displayed.add(task)
