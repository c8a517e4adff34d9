"""The design docs stay true to the repo: links resolve, named files exist, wire tables match the code.

A user who clones the project has only the repo, so the README and docs/ may
link to nothing outside it, and every source file they name must exist (a
rename that forgets the docs fails here).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from matchlock.wire import boot
from matchlock.wire.frames import FrameKind

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE_PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|config|sh|md))`")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_docs_exist() -> None:
    names = {_rel(p) for p in DOCS}
    assert {"README.md", "docs/architecture.md", "docs/wire.md", "docs/README.md"} <= names, names
    assert len(list((ROOT / "docs" / "adr").glob("000*.md"))) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_links_stay_inside_the_repo_and_resolve(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{_rel(doc)} links outside the repo: {target}"
        assert resolved.exists(), f"{_rel(doc)} links to {target}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_named_source_files_exist(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text, f"{_rel(doc)} names a path outside the repo"
    for name in CODE_PATH.findall(text):
        candidates = [ROOT / name, ROOT / "src" / "matchlock" / name, doc.parent / name]
        assert any(c.exists() for c in candidates), f"{_rel(doc)} names {name}, which is not in the repo"


def test_frame_kind_table_matches_the_code() -> None:
    table = _section((ROOT / "docs" / "wire.md").read_text(), "Frames")
    rows = dict((int(k), name) for k, name in re.findall(r"^\| (\d+) \| ([A-Z]+) \|", table, re.M))
    kinds = {value: name for name, value in vars(FrameKind).items() if name.isupper()}
    assert rows == kinds


def test_boot_contract_names_match_the_code() -> None:
    section = " ".join(_section((ROOT / "docs" / "wire.md").read_text(), "Boot-time contract").split())
    for value in (boot.AGENT_PORT_NAME, boot.RUNTIME_DISK_SERIAL, boot.LOWER_DISK_SERIAL, boot.UPPER_DISK_SERIAL,
                  boot.TEMPLATE_FLAG, boot.CA_PATH, boot.DEFAULT_PATH):  # fmt: skip
        assert f"`{value}`" in section or f"={value}`" in section, value
    assert f"`{boot.TEMPLATE_READY.decode()}`" in section and f"{boot.WAKE_SIZE} random bytes" in section
