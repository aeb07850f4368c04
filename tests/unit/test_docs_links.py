"""Every relative link of README.md and docs/*.md leads somewhere: the file exists and, for a
``#anchor``, a heading of that file makes that anchor (GitHub's rule: lower case, punctuation
dropped, spaces to hyphens, ``-1``, ``-2`` for repeats). Links out of the repository are not
followed: what users need must be in it."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()  # a link keeps its text
    kept = "".join(
        char for char in text if char in " -_" or unicodedata.category(char)[0] in "LN"
    )  # letters and digits of any script, spaces, hyphens, underscores
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    found = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        base = slug(match.group(1))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [match.group(1) for match in LINK.finditer(text)]


def test_the_slug_follows_githubs_rule() -> None:
    assert slug("What `./run demo` shows") == "what-run-demo-shows"
    assert slug("Sender obligations (§9): suppressions, one-click unsubscribe") == (
        "sender-obligations-9-suppressions-one-click-unsubscribe"
    )
    assert slug("1.2 `oauth` — OAuth Server-to-Server (Adobe's replacement for JWT)") == (
        "12-oauth--oauth-server-to-server-adobes-replacement-for-jwt"
    )
    assert slug("The sender's duties: on/off") == "the-senders-duties-onoff"


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1"}


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The check itself can fail: a missing file and a missing anchor are both reported."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n[gone](missing.md) [here](#title) [nowhere](#nope) `[code](x.md)`\n")
    assert _broken(page) == ["missing.md: no such file", "#nope: no such heading in page.md"]


def _broken(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{target}: no such heading in {destination.name}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert _broken(document) == []


def test_the_readme_links_to_the_reference_and_the_figures() -> None:
    targets = {target.partition("#")[0] for target in links(ROOT / "README.md")}
    assert {"docs/reference.md", "docs/figures.md", "docs/SPEC.md"} <= targets
