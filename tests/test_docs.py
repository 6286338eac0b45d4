"""The README and docs/ as a reader meets them: every relative link and picture resolves to a file
in the repository, and the README stays short enough to read in five minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target), ![alt](picture "title")


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that point into the repository (no URL, no anchor-only)."""
    targets = [m.group(1).split("#", 1)[0] for m in _LINK.finditer(page.read_text(encoding="utf-8"))]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_picture_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_the_readme_is_short_and_shows_the_three_workflows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    pictures = [t for t in relative_links(ROOT / "README.md") if t.endswith(".png")]
    assert {"docs/screenshots/regions.png", "docs/screenshots/fusion.png", "docs/screenshots/training.png"} <= set(
        pictures), pictures


def test_the_link_reader_finds_what_a_reader_clicks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [a](docs/a.md), ![p](pic.png \"t\"), [web](https://x.org/y), [top](#install)\n")
    assert relative_links(page) == ["docs/a.md", "pic.png"]
