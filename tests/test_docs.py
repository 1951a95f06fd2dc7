"""The README and docs/ stay true to the tree: every local link resolves, every module and recipe
is listed, the README's test command is the one CI runs, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def local_links(text: str) -> list[str]:
    """The targets of the Markdown links in ``text`` that name a local file, without their
    ``#anchor``; links inside fenced code, to a URL, or to an anchor of the same page are left
    out."""
    text = _FENCE.sub("", text)
    out = []
    for target in _LINK.findall(text):
        if _EXTERNAL.match(target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def broken_links(page: Path) -> list[str]:
    """The local links of ``page`` whose file or folder does not exist, relative to the page."""
    return [t for t in local_links(page.read_text()) if not (page.parent / t).exists()]


def test_link_checker_sees_what_it_is_about(tmp_path: Path) -> None:
    (tmp_path / "here.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](here.md) [anchored](here.md#part) [gone](gone.md) [gone too](sub/gone.md#x)\n"
        '[web](https://example.org/x.md) [mail](mailto:a@b.c) [self](#top) [t](here.md "title")\n'
        "```\n[in code](not_a_link.md)\n```\n![image](missing.png)\n"
    )
    assert local_links(page.read_text()) == [
        "here.md",
        "here.md",
        "gone.md",
        "sub/gone.md",
        "here.md",
        "missing.png",
    ]
    assert broken_links(page) == ["gone.md", "sub/gone.md", "missing.png"]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_local_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_links_to_every_docs_page() -> None:
    linked = {(README.parent / t).resolve() for t in local_links(README.read_text())}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/"


def test_module_map_lists_every_module() -> None:
    """One row per module of src/skinlesion (a room's empty ``__init__.py`` is its room)."""
    src = REPO / "src" / "skinlesion"
    text = README.read_text()
    modules = [
        p.relative_to(src).as_posix()
        for p in sorted(src.rglob("*.py"))
        if not (p.name == "__init__.py" and p.parent != src)
    ]
    assert len(modules) > 50
    assert [m for m in modules if f"| `{m}` |" not in text] == []


def test_recipes_table_lists_every_config() -> None:
    text = README.read_text()
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    assert [c.name for c in configs if f"| `configs/{c.name}` |" not in text] == []


def test_readme_test_command_is_what_ci_runs() -> None:
    """CI (.ci/run) runs the test command written at the top of the README."""
    first_block = _FENCE.search(README.read_text())
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(0).splitlines()[1:-1]]
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert "make test" in commands and ci[-1] == "make test"
    assert re.search(r"^test:", (REPO / "Makefile").read_text(), re.MULTILINE)
