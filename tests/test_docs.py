"""Citations of repository files resolve: no dead references in code, tests, benchmarks,
examples or documentation.

Scans the ``.py`` and ``.md`` files under ``pyro_perturb/``, ``tests/``, ``bench/``,
``examples/`` and ``docs/``, and ``README.md``, for

* repository paths: text starting with one of the top-level folders of ``ROOTS`` followed
  by a slash (a file such as the models page of the docs folder, a benchmark script, a
  results table, a test module), which must exist as a file or folder;
* a section cited right after a Markdown path (``<path>, "Section name"``) or as an anchor
  (``<path>#section-name``), which must be a heading of that file;
* bare Markdown file names (``NAME.md`` without a folder), which must be the name of a
  Markdown file somewhere in the repository.

Lines that cite an earlier commit (``git show REV:path``, "in the git history") are
skipped. Paths built at run time (followed by ``{``, ``*``, ``<`` or ``$``) are skipped. This file is
not scanned (its examples are not citations). On failure every dead reference is listed
with its file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("docs", "bench", "tests", "pyro_perturb", "examples")
SCANNED_SUFFIXES = (".py", ".md")
SKIP_DIRS = {"__pycache__", ".git", ".venv", ".pytest_cache", ".hypothesis", "node_modules"}

# a repository path: one of ROOTS, a slash, then path characters; not part of a longer
# path (an absolute path, or a path under another folder, is not a citation of this repo)
PATH = re.compile(r"(?<![\w/.\-])((?:%s)/[A-Za-z0-9_./\-]*)" % "|".join(ROOTS))
# a bare Markdown file name (no folder before it)
BARE_MD = re.compile(r"(?<![\w/.\-])([A-Za-z0-9_\-]+\.md)\b")
# what may follow a cited Markdown path: an anchor, or a quoted section name
ANCHOR = re.compile(r"#([A-Za-z0-9_\-]+)")
SECTION = re.compile(r"""\s*,?\s*["“]([^"”\n]{2,80})["”]""")
TEMPLATE_NEXT = set("{*<$%[")


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    for top in ROOTS:
        base = ROOT / top
        if not base.exists():
            continue
        for path in sorted(base.rglob("*")):
            if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts):
                continue
            if path.is_file() and path.suffix in SCANNED_SUFFIXES and path != Path(__file__).resolve():
                files.append(path)
    return files


def _markdown_names() -> set[str]:
    names = set()
    for path in ROOT.rglob("*.md"):
        if not any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts):
            names.add(path.name)
    return names


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _headings(path: Path) -> list[str]:
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def _clean(match: str) -> str:
    """Strip the sentence punctuation that a path pattern swallows at its end."""
    return match.rstrip(".,;:-")


def dead_references() -> list[str]:
    """``"file:line: reason"`` for every citation that does not resolve."""
    md_names = _markdown_names()
    headings: dict[Path, list[str]] = {}
    problems = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            if "git show" in line or "git history" in line:
                continue  # a file of an earlier commit, not of this tree
            for m in PATH.finditer(line):
                end = m.end()
                if end < len(line) and line[end] in TEMPLATE_NEXT:
                    continue  # built at run time
                cited = _clean(m.group(1))
                target = ROOT / cited.rstrip("/")
                if not target.exists():
                    problems.append(f"{rel}:{lineno}: {cited} does not exist")
                    continue
                if target.suffix != ".md" or not target.is_file():
                    continue
                rest = line[m.start() + len(cited):]
                if target not in headings:
                    headings[target] = _headings(target)
                anchor = ANCHOR.match(rest)
                if anchor and anchor.group(1).lower() not in {_slug(h) for h in headings[target]}:
                    problems.append(f"{rel}:{lineno}: {cited} has no section #{anchor.group(1)}")
                section = SECTION.match(rest)
                if section and section.group(1).strip().lower() not in {h.lower() for h in headings[target]}:
                    problems.append(f'{rel}:{lineno}: {cited} has no section "{section.group(1)}"')
            for m in BARE_MD.finditer(line):
                if m.group(1) not in md_names:
                    problems.append(f"{rel}:{lineno}: {m.group(1)} is not a Markdown file of this repository")
    return problems


def test_scanner_finds_citations():
    """The patterns see what they are meant to see (guards against a scan that passes
    because it matches nothing)."""
    line = 'see docs/models.md, "SAMS-VAE", bench/results/x.md#a, tests/devices.py and NOTES.md.'
    assert [_clean(m.group(1)) for m in PATH.finditer(line)] == [
        "docs/models.md", "bench/results/x.md", "tests/devices.py"
    ]
    assert [m.group(1) for m in BARE_MD.finditer(line)] == ["NOTES.md"]
    assert not list(PATH.finditer("/work/shared/docs/X.md and pyro_perturb.models.fcr"))
    assert _slug("sVAE family") == "svae-family" and _slug("Group R2 and DE genes") == "group-r2-and-de-genes"
    assert len(_scanned_files()) > 20


def test_every_cited_repository_path_exists():
    problems = dead_references()
    assert not problems, (
        f"{len(problems)} dead reference(s) to repository files (cite a file that exists, "
        "and a section it has):\n" + "\n".join(problems)
    )
