"""The README's links into the repository resolve: `make docs` checks every link between the pages of
docs/, but the README lies outside the site, so its relative links (to docs/*.md and their headings)
are checked here, with the heading anchors MyST and GitHub both make."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$")


def github_slug(title: str) -> str:
    """GitHub's heading anchor, which MyST's myst_heading_anchors makes too (myst_parser.slugs)."""
    text = title.replace("`", "").lower().replace(" ", "-")
    return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", text)


def anchors(page: Path) -> set:
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (heading := HEADING.match(line)):
            found.add(github_slug(heading.group("title")))
    return found


def test_every_relative_link_of_the_readme_names_a_file_and_heading_that_exist() -> None:
    broken = []
    for match in LINK.finditer((REPO / "README.md").read_text(encoding="utf-8")):
        target = match.group("target")
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        page = REPO / path if path else REPO / "README.md"
        if not page.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and anchor not in anchors(page):
            broken.append(f"{target}: {path or 'README.md'} has no heading whose anchor is #{anchor}")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)


def test_the_readme_leads_to_the_docs_index_and_the_design_page() -> None:
    """A newcomer's path: README -> docs/index.md -> the topic pages and docs/design.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    assert "](docs/index.md)" in readme and "](docs/design.md)" in readme
    topic_pages = sorted(page.name for page in (REPO / "docs").glob("*.md") if page.name != "index.md")
    assert [name for name in topic_pages if f"]({name})" not in index] == []
