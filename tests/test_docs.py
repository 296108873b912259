"""The docs cannot drift from the code: every command they show is checked against the program.

README.md and docs/*.md: each `stepstone-X SUB ... --opt` (in a code block or an inline code span)
names a subcommand that exists and options that `stepstone-X SUB --help` lists; each
`python bench/X.py --opt` a file whose `--help` lists them; each `scripts/X` an executable; each
`zkg install` only user variables zkg.meta declares. Every relative link resolves to a file, and
its anchor to a heading there. The README's first two commands are `scripts/demo`, `scripts/test`.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("stepstone-analyzer", "stepstone-prober", "stepstone-responder", "stepstone-lab")
BIN = Path(sys.executable).parent

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
# What a shown command may carry before the program: a systemd ExecStart=, sudo, VAR=value, a path
# to the venv or /opt.
LEAD = re.compile(r"^(?:ExecStart=)?(?:sudo\s+)?(?:[A-Z_]+=\S*\s+)*(?:\S*/)?"
                  r"(?=(?:stepstone-|python\b|scripts/|zkg\b))")
PIPE = re.compile(r"\|\s*(?=(?:sudo\s+)?(?:\S*/)?(?:stepstone-[a-z]+|python)\b)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _code_lines(text: str) -> list[str]:
    """Command candidates: code block lines (continuations joined) and inline code spans."""
    out: list[str] = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.split(" # ")[0].split("  #")[0].strip() for line in joined.splitlines()]
    without_blocks = FENCE.sub("", text)
    out += [" ".join(span.split()) for span in INLINE.findall(without_blocks)]
    return out


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            for piece in PIPE.split(line):
                part = piece.strip()
                m = LEAD.match(part)
                if m is not None:
                    found.append((doc.relative_to(ROOT).as_posix(), part[m.end():]))
    return found


COMMANDS = _commands()


@functools.cache
def _help(*argv: str) -> str:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-500:]}"
    return proc.stdout


def _program_commands() -> list[tuple[str, str, str, list[str]]]:
    out = []
    for doc, cmd in COMMANDS:
        m = re.match(rf"({'|'.join(PROGRAMS)})\s+([a-z][a-z-]*)\b(.*)", cmd)
        if m:
            out.append((doc, m[1], m[2], OPTION.findall(m[3])))
    return out


def test_the_docs_show_commands_of_every_program() -> None:
    # The extraction itself could silently find nothing: hold it to what the docs are known to show.
    programs = {prog for _, prog, _, _ in _program_commands()}
    assert programs == set(PROGRAMS)
    assert any(cmd.startswith("python bench/") for _, cmd in COMMANDS)
    assert any(cmd.startswith("zkg install") for _, cmd in COMMANDS)


@pytest.mark.parametrize(("doc", "prog", "sub", "options"), _program_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_program_commands_match_their_help(doc: str, prog: str, sub: str, options: list[str]) -> None:
    exe = BIN / prog
    assert exe.exists(), f"{exe} is not installed (pip install -e .)"
    top = _help(str(exe), "--help")
    assert re.search(rf"^\s+{re.escape(sub)}\b", top, re.M) or f"{{{sub}," in top or f",{sub}" in top, \
        f"{doc}: `{prog} {sub}` is not a subcommand of {prog}"
    text = _help(str(exe), sub, "--help")
    missing = [o for o in options if not re.search(rf"{re.escape(o)}(?![\w-])", text)]
    assert not missing, f"{doc}: `{prog} {sub}` shows {missing}, which `{prog} {sub} --help` does not list"


def _bench_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for doc, cmd in COMMANDS:
        m = re.match(r"python\s+(bench/[\w-]+\.py)(.*)", cmd)
        if m:
            out.append((doc, m[1], OPTION.findall(m[2])))
    return out


@pytest.mark.parametrize(("doc", "script", "options"), _bench_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_bench_commands_match_their_help(doc: str, script: str, options: list[str]) -> None:
    assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
    text = _help(sys.executable, script, "--help")
    missing = [o for o in options if not re.search(rf"{re.escape(o)}(?![\w-])", text)]
    assert not missing, f"{doc}: `python {script}` shows {missing}, which its --help does not list"


def test_scripts_shown_exist_and_are_executable() -> None:
    shown = {(doc, m[0]) for doc, cmd in COMMANDS for m in [re.match(r"scripts/[\w-]+", cmd)] if m}
    assert {s for _, s in shown} >= {"scripts/demo", "scripts/test"}
    for doc, script in shown:
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), f"{doc}: {script} is not an executable"


def test_zkg_install_uses_declared_user_variables() -> None:
    meta = (ROOT / "zkg.meta").read_text()
    declared = set(re.findall(r"^\s+([A-Z_]+) \[", meta, re.M))
    shown = [(doc, cmd) for doc, cmd in COMMANDS if cmd.startswith("zkg install")]
    assert any("--user-var" in cmd for _, cmd in shown)
    for doc, cmd in shown:
        used = set(re.findall(r"--user-var\s+([A-Z_]+)=", cmd))
        assert used <= declared, f"{doc}: {cmd} uses {used - declared}, not in zkg.meta"


def test_the_readme_starts_with_the_two_commands() -> None:
    first = FENCE.search((ROOT / "README.md").read_text())
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first[1].splitlines()]
    assert commands == ["scripts/demo", "scripts/test"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    text = FENCE.sub("", path.read_text())
    for heading in re.findall(r"^#{1,6}\s+(.*)$", text, re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_resolve() -> None:
    bad = []
    links = 0
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            links += 1
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{doc.name}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{doc.name}: {target}: no such heading")
    assert links > 20
    assert not bad, "\n".join(bad)
