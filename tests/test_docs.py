"""The documentation stays inside the repository: no file cites the team's private notes, and every relative
link in the markdown files points to a file that exists. Pure Python (no vLLM, no steerserve import)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ".html", ".js", ".cfg", ".ini", ".txt"}
TEXT_NAMES = {"Makefile", "run"}  # `run`: .ci/run, a shell script without a suffix

# Notes that live outside the repository, by name. The names are assembled here rather than written out, so that
# this file, which must name them to find them, does not itself cite them. Our own page with the same name as one
# of the notes (docs/<models page>) is ours: a bare mention only counts when it is not preceded by `docs/` and is
# not a markdown link that resolves to a file here (docs/ pages link it by its bare name).
MD = ".md"
NOTE_PAGES = ("methods", "architecture", "landscape", "style")
NOTE_TAGS = ("vllm" + "-notes", "scale-out" + "-notes", "shared" + "/docs")
MODELS_PAGE = "models" + MD  # a note's name, and also one of our docs pages
OUTSIDE_NOTES = re.compile(
    r"\b(?:" + "|".join(NOTE_PAGES) + r")\.md\b"
    + "|" + "|".join(re.escape(tag) for tag in NOTE_TAGS)
    + r"|(?<!docs/)\b" + re.escape(MODELS_PAGE) + r"\b"
)

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?([^\s>]+)>?")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
MD_PATH = re.compile(r"[\w./-]+\.md\b")


def tracked_files() -> list[Path]:
    """The repository's files: git's list where there is a checkout, else a walk that skips hidden and build
    directories."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(".egg-info")
                           and d not in ("node_modules", "site", "__pycache__")]
            files += [Path(dirpath) / f for f in filenames]
        return files


def is_text(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES or path.name.startswith("Dockerfile")


def outside_note_citations(text: str, md_file: Path | None = None) -> list[tuple[int, str]]:
    """(line number, line) of every line that names one of the team's notes. In a markdown file, links that
    resolve to a file in the repository are ours and do not count."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        scanned = line
        if md_file is not None:
            scanned = INLINE_LINK.sub(lambda m: "" if resolves(md_file, m.group(1)) else m.group(0), line)
        if OUTSIDE_NOTES.search(scanned):
            found.append((n, line.strip()))
    return found


def resolves(md_file: Path, target: str, root: Path = ROOT) -> bool:
    """Whether a link target of `md_file` is external, an anchor, or an existing file (anchors not checked)."""
    if EXTERNAL.match(target) or target.startswith("#"):
        return True
    path = target.split("#", 1)[0].split("?", 1)[0]
    return ((root / path.lstrip("/")) if path.startswith("/") else (md_file.parent / path)).exists()


def link_targets(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code blocks and inline code."""
    targets = []
    in_fence = False
    for n, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = INLINE_CODE.sub("", line)
        targets += [(n, m.group(1)) for m in INLINE_LINK.finditer(line)]
        targets += [(n, m.group(1)) for m in REFERENCE_LINK.finditer(line)]
    return targets


def broken_links(md_file: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Relative links of a markdown file whose file does not exist (anchors are not checked)."""
    return [(n, target) for n, target in link_targets(md_file.read_text(encoding="utf-8"))
            if not resolves(md_file, target, root)]


def test_no_file_cites_the_private_notes():
    found = []
    for path in tracked_files():
        if path.resolve() == THIS or not is_text(path) or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path == ROOT / "mkdocs.yml":  # its nav names pages relative to docs/
            text = MD_PATH.sub(lambda m: "" if (ROOT / "docs" / m.group(0)).is_file() else m.group(0), text)
        md_file = path if path.suffix == ".md" else None
        found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in outside_note_citations(text, md_file)]
    assert not found, ("these lines cite notes that are not in the repository; state the fact or link a page "
                       "under docs/ instead:\n" + "\n".join(found))


def test_relative_links_in_markdown_resolve():
    md_files = [p for p in tracked_files() if p.suffix == ".md" and p.is_file()]
    assert ROOT / "README.md" in md_files and any(p.parent.name == "docs" for p in md_files)
    found = [f"{md.relative_to(ROOT)}:{n}: {target}" for md in md_files for n, target in broken_links(md)]
    assert not found, "links to files that do not exist:\n" + "\n".join(found)


def test_the_checks_catch_planted_problems(tmp_path):
    notes, first_page, models = NOTE_TAGS[0], NOTE_PAGES[0] + MD, MODELS_PAGE
    assert outside_note_citations(f"see {notes} §6\nfine\n({first_page} §3)") == [
        (1, f"see {notes} §6"), (3, f"({first_page} §3)")]
    assert outside_note_citations(f"the store ({models}): ...")
    assert not outside_note_citations(f"see docs/{models} and docs/methods/attention-modes.md")

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# there\n")
    (tmp_path / "docs" / models).write_text("# models\n")
    page = tmp_path / "docs" / "page.md"
    assert not outside_note_citations(f"[models]({models}#gemma)", page)
    assert outside_note_citations(f"[models](../{models}) and {models}", page) == [
        (1, f"[models](../{models}) and {models}")]

    page = tmp_path / "README.md"
    page.write_text("[ok](docs/there.md#a) [web](https://example.org) [anchor](#top) ![img](docs/there.md)\n"
                    "[gone](docs/missing.md) `[code](docs/nope.md)`\n"
                    "```\n[in a block](docs/nope.md)\n```\n"
                    "[ref]: docs/also-missing.md\n")
    assert broken_links(page, tmp_path) == [(2, "docs/missing.md"), (6, "docs/also-missing.md")]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs-material is not installed")
def test_the_site_builds_strictly(tmp_path):
    """`make docs`: mkdocs.yml's strict build (a broken link or anchor in docs/ is an error), about 2 s."""
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
