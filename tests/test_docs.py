"""docs/: every reference from the source code and every link between the pages points at a file and a section
that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _headings(path: Path) -> list[str]:
    return [ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_source_references_name_existing_pages_and_sections():
    refs = 0
    for py in (ROOT / "src").rglob("*.py"):
        text = re.sub(r"\s+", " ", py.read_text())
        for page, section in re.findall(r"docs/(\w+)\.md`{0,2}(?: § ([A-Z][\w -]*?)(?=[),.;]| and))?", text):
            refs += 1
            path = DOCS / f"{page}.md"
            assert path.is_file(), (py.name, page)
            if section:
                assert any(h.startswith(section.strip()) for h in _headings(path)), (py.name, page, section)
    assert refs >= 20
    old = [str(p) for p in (ROOT / "src").rglob("*.py")
           if re.search(r"(?<!docs/)\b(method|medvqa|vgmed|hf_notes)\.md|spec §", p.read_text())]
    assert not old, old


def test_links_between_pages_resolve():
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for target, anchor in re.findall(r"\]\(((?:docs/)?\w+\.md)?(?:#([\w-]+))?\)", page.read_text()):
            if not target and not anchor:
                continue
            path = (page.parent / target) if target else page
            assert path.is_file(), (page.name, target)
            if anchor:
                assert anchor in {_anchor(h) for h in _headings(path)}, (page.name, target, anchor)
