"""The README and docs/: every relative link and image resolves to a file that exists, every #anchor to a
heading of its target page (GitHub's anchor rule), and the README stays a one-page read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Set, Tuple

import pytest
from conftest import REPO_ROOT

README_MAX_BYTES = 15_000
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(match) for match in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> List[Tuple[str, Path, str]]:
    """(link as written, target file, anchor or '') for every relative link outside code blocks."""
    found = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        found.append((target, (page.parent / path).resolve() if path else page, fragment))
    return found


def test_anchor_rule_matches_githubs():
    assert anchor("Query batching: how far do low-rank query gradients move the scores?") == (
        "query-batching-how-far-do-low-rank-query-gradients-move-the-scores"
    )
    assert anchor("TF32: its accuracy cost, measured without a GPU") == "tf32-its-accuracy-cost-measured-without-a-gpu"
    assert anchor("Several processes (torchrun)") == "several-processes-torchrun"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_link_resolves(page):
    assert links(page) or page.name != "README.md", "the README links to docs/"
    broken = []
    for written, target, fragment in links(page):
        if not target.exists():
            broken.append(f"{written}: no file {target}")
        elif fragment and fragment not in anchors(target):
            broken.append(f"{written}: no heading #{fragment} in {target.name}")
    assert not broken, broken


def test_readme_is_one_page_and_links_every_doc():
    readme = REPO_ROOT / "README.md"
    assert readme.stat().st_size < README_MAX_BYTES
    linked = {target for _, target, _ in links(readme)}
    assert set(PAGES[1:]) <= linked, "every page under docs/ is reachable from the README"
