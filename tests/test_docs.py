"""The documentation stays true: generated parts match the code and results/, the README stays short and
free of development narrative, its links exist, and every documented command parses against the real CLI."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import typer

from cctr import config, docs_gen
from cctr.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_doc_is_generated_from_the_code():
    assert (ROOT / "docs" / "configuration.md").read_text() == docs_gen.render_configuration(), \
        "docs/configuration.md is stale: run `python -m cctr.docs_gen`"


def test_every_config_key_has_a_meaning():
    for section, cls_name, _ in docs_gen.SECTIONS:
        cls = getattr(config, cls_name)
        meanings = docs_gen.meaning(section, cls)
        missing = [f.name for f in dataclasses.fields(cls) if not meanings.get(f.name)]
        assert not missing, f"{section}: no comment in cctr/config.py and no docs_gen.FALLBACK for {missing}"
    assert "DESIGN" not in docs_gen.render_configuration()


def test_readme_table1_excerpt_is_generated_from_results():
    readme = (ROOT / "README.md").read_text()
    assert readme == docs_gen.readme_with_excerpt(readme), "README's Table 1 is stale: run `python -m cctr.docs_gen`"
    assert "| cctr |" in readme


def test_the_excerpt_shows_a_dataset_s_full_grid_in_place_of_its_partial_ones(tmp_path, monkeypatch):
    def table(title: str, row: str) -> str:
        return f"# {title}\n\n## Best-val checkpoint\n\n| method | Dice |\n|---|---|\n| {row} | 0.5 |\n\nafter\n"
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "table1_a.md").write_text(table("A, 1 labeled", "partial-a"))
    (tmp_path / "one" / "table1_b.md").write_text(table("B, 1 labeled", "partial-b"))
    (tmp_path / "table1_a.md").write_text(table("A, full", "full-a"))
    monkeypatch.setattr(docs_gen, "ROOT", tmp_path)
    monkeypatch.setattr(docs_gen, "RESULTS", tmp_path)
    text = docs_gen.render_table1_excerpt()
    assert "| full-a | 0.5 |" in text and "| partial-b | 0.5 |" in text
    assert "partial-a" not in text and "after" not in text


def test_readme_is_short_and_has_no_development_narrative():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"issue [0-9]|session|\b[0-9a-f]{7,40}\b", text)
    assert "../" not in text and "DESIGN" not in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_local_links_exist(doc):
    for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_docs_open_with_their_purpose():
    for doc in sorted((ROOT / "docs").glob("*.md")):
        lines = [ln for ln in doc.read_text().splitlines() if ln.strip()]
        assert lines[0].startswith("# ") and len(lines) > 1, doc.name
    for doc in sorted((ROOT / "docs" / "experiments").glob("*.md")):
        head = doc.read_text()[:800]
        for field in ("Date:", "Commit:", "Machine:", "Status:"):
            assert field in head, f"{doc.name} lacks {field}"


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for every `cctr ...` or `make ...` line in a fenced code block."""
    out = []
    for doc in DOCS:
        in_block = False
        for line in doc.read_text().splitlines():
            if line.strip().startswith("```"):
                in_block = not in_block
                continue
            s = line.strip()
            if in_block and re.match(r"^([A-Z_]+=\S+ )*(cctr|make) ", s + " "):
                out.append((doc.name, s.split(" #")[0].strip()))
    return out


COMMANDS = documented_commands()


def test_docs_show_commands():
    assert len(COMMANDS) > 20
    assert any(c.startswith("cctr train --dataset") for _, c in COMMANDS)


def _parse(args: list[str]) -> None:
    """Parse like `cctr ARGS` would, without running anything: unknown commands or options, bad types and
    values outside a choice raise."""
    cmd = typer.main.get_command(app)
    path = ["cctr"]
    while hasattr(cmd, "commands"):
        assert args, f"`{' '.join(path)}` needs a command"
        name, args = args[0], args[1:]
        sub = cmd.commands.get(name)
        assert sub is not None, f"no command `{' '.join(path)} {name}`"
        cmd, path = sub, [*path, name]
    cmd.make_context(" ".join(path), list(args))


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_parses(doc, line):
    words = shlex.split(line)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if words[0] == "make":
        targets = re.findall(r"^([a-z0-9-]+):", (ROOT / "Makefile").read_text(), re.M)
        for t in words[1:]:
            assert "=" in t or t in targets, f"{doc}: no make target {t}"
        return
    _parse(words[1:])
