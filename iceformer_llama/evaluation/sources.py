"""Where eval's documents come from: a fixed catalogue of texts found on the machine, read as paragraphs.

Nothing is downloaded or shipped: every source is part of the Python installation that runs this
package, or of the Debian system it runs on (the man and info pages of packages in the image). A
source missing on a machine is reported as skipped, never replaced by something else.

Classes (what kind of text) and the split (choose settings on `tune`, report them on `report`):

| class      | id                      | split  | what                                        | licence           |
|------------|-------------------------|--------|---------------------------------------------|-------------------|
| prose      | man:bash                | report | bash(1) manual page, rendered by groff      | GPL-3+            |
| prose      | info:grep               | report | GNU grep manual (info)                      | GFDL-1.3+         |
| prose      | python:reference        | report | Python language reference (pydoc_data)      | PSF-2.0           |
| prose      | man:git-rebase          | report | git-rebase(1) manual page                   | GPL-2             |
| prose      | man:tmux                | tune   | tmux(1) manual page                         | ISC               |
| prose      | info:sed                | tune   | GNU sed manual (info)                       | GFDL-1.3+         |
| code       | py:pydoc                | report | Lib/pydoc.py, comments and docstrings kept  | PSF-2.0           |
| code       | py:mailbox              | report | Lib/mailbox.py                              | PSF-2.0           |
| code       | py:optparse             | report | Lib/optparse.py                             | PSF-2.0           |
| code       | py:_pyio                | tune   | Lib/_pyio.py                                | PSF-2.0           |
| code       | py:pdb                  | tune   | Lib/pdb.py                                  | PSF-2.0           |
| copy-heavy | docstrings:argparse...  | report | stdlib docstrings (corpus.py), module group | PSF-2.0           |

copy-heavy is the docstring text eval used before (corpus.py): inspect.getdoc repeats inherited
docstrings, so the text repeats itself (dense perplexity near 1) as prompts that repeat their content do.
It keeps that repetition (no deduplication); its four module groups are split 3 report / 1 tune.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from . import corpus

CLASSES = ("prose", "code", "copy-heavy")
SPLITS = ("tune", "report")
MAN_DIR = Path("/usr/share/man/man1")
INFO_DIR = Path("/usr/share/info")


@dataclass(frozen=True)
class Source:
    id: str
    klass: str        # prose, code, copy-heavy
    split: str        # tune or report
    kind: str         # man, info, pytopics, pysource, docstrings
    name: str         # page, manual, module, or module group (first..last of corpus._MODULES)
    licence: str
    what: str

    def as_dict(self) -> dict:
        return {"id": self.id, "class": self.klass, "split": self.split, "licence": self.licence, "what": self.what}


def _docstring_groups() -> list[tuple[str, ...]]:
    m = corpus._MODULES
    return [m[0:6], m[6:14], m[14:16], m[16:]]


def _group_id(group) -> str:
    return f"docstrings:{group[0]}..{group[-1]}"


CATALOGUE: tuple[Source, ...] = (
    Source("man:bash", "prose", "report", "man", "bash", "GPL-3+", "bash(1) manual page (Debian package bash)"),
    Source("info:grep", "prose", "report", "info", "grep", "GFDL-1.3+", "GNU grep manual (info, Debian package grep)"),
    Source("python:reference", "prose", "report", "pytopics", "", "PSF-2.0",
           "Python language reference topics (pydoc_data.topics of this Python)"),
    Source("man:git-rebase", "prose", "report", "man", "git-rebase", "GPL-2",
           "git-rebase(1) manual page (Debian package git-man)"),
    Source("man:tmux", "prose", "tune", "man", "tmux", "ISC", "tmux(1) manual page (Debian package tmux)"),
    Source("info:sed", "prose", "tune", "info", "sed", "GFDL-1.3+", "GNU sed manual (info, Debian package sed)"),
    Source("py:pydoc", "code", "report", "pysource", "pydoc", "PSF-2.0", "Lib/pydoc.py of this Python"),
    Source("py:mailbox", "code", "report", "pysource", "mailbox", "PSF-2.0", "Lib/mailbox.py of this Python"),
    Source("py:optparse", "code", "report", "pysource", "optparse", "PSF-2.0", "Lib/optparse.py of this Python"),
    Source("py:_pyio", "code", "tune", "pysource", "_pyio", "PSF-2.0", "Lib/_pyio.py of this Python"),
    Source("py:pdb", "code", "tune", "pysource", "pdb", "PSF-2.0", "Lib/pdb.py of this Python"),
    *(Source(_group_id(g), "copy-heavy", "tune" if i == 1 else "report", "docstrings", ",".join(g), "PSF-2.0",
             f"docstrings of the stdlib modules {', '.join(g)} (inherited ones repeated)")
      for i, g in enumerate(_docstring_groups())),
)


class SourceMissing(Exception):
    """The source is not on this machine (package or tool not installed)."""


# ------------------------------------------------------------------------------------------------
# Readers: each returns the source's text, paragraphs separated by blank lines


def render_man(page: str) -> str:
    """A man page as plain text: groff without justification, hyphenation, page breaks or styling."""
    path = MAN_DIR / f"{page}.1.gz"
    if not path.is_file():
        raise SourceMissing(f"{path} not found")
    if shutil.which("groff") is None:
        raise SourceMissing("groff not installed")
    roff = gzip.decompress(path.read_bytes())
    proc = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=3000n", "-rcR=1", "-dAD=l", "-rHY=0"],
                          input=roff, capture_output=True, timeout=120, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise SourceMissing(f"groff failed on {path}: {proc.stderr.decode(errors='replace').strip()[:200]}")
    lines = [ln.rstrip() for ln in proc.stdout.decode("utf-8", errors="replace").splitlines()]
    body = [i for i, ln in enumerate(lines) if ln.strip()]
    lines = lines[body[0] + 1:body[-1]] if len(body) > 2 else []   # the page header and footer lines
    return textwrap.dedent("\n".join(lines)).strip("\n")


_INFO_NODE = re.compile(r"^File: [^,]+,\s+Node:")
_MENU_ENTRY = re.compile(r"^\* [^:]+::|^\* .+: .+\.(\s+\(line\s+\d+\))?$")


def render_info(manual: str) -> str:
    """A GNU info manual as plain text: its nodes in file order, without node headers, menus or indexes."""
    parts = sorted(INFO_DIR.glob(f"{manual}.info-*.gz"), key=lambda p: int(p.name.rsplit("-", 1)[1][:-3]))
    if not parts:
        parts = [INFO_DIR / f"{manual}.info.gz"]
    if not parts[0].is_file():
        raise SourceMissing(f"{parts[0]} not found")
    out = []
    for part in parts:  # a split manual's parts each start with a preamble before the first node
        for node in gzip.decompress(part.read_bytes()).decode("utf-8", errors="replace").split("\x1f")[1:]:
            lines = node.strip("\n").splitlines()
            if lines and _INFO_NODE.match(lines[0]):
                out.append("\n".join(lines[1:]))
    kept = []
    for para in paragraphs("\n\n".join(out)):
        first = para.lstrip().splitlines()[0]
        if first.startswith("* Menu:") or _MENU_ENTRY.match(first) or "\x00" in para:
            continue
        kept.append(para)
    return "\n\n".join(kept)


def python_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def python_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise SourceMissing(f"no Python source for {module}")
    return Path(spec.origin).read_text(encoding="utf-8")


def docstrings(modules: str) -> str:
    return "\n\n".join(doc.strip() for m in modules.split(",") for doc in corpus._docstrings(m))


def read_source(source: Source) -> str:
    """The source's full text (SourceMissing when it is not on this machine)."""
    if source.kind == "man":
        return render_man(source.name)
    if source.kind == "info":
        return render_info(source.name)
    if source.kind == "pytopics":
        return python_topics()
    if source.kind == "pysource":
        return python_source(source.name)
    if source.kind == "docstrings":
        return docstrings(source.name)
    raise ValueError(f"unknown source kind {source.kind!r}")


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines (lines of whitespace), trailing spaces stripped, indentation kept."""
    out, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            out.append("\n".join(block))
            block = []
    if block:
        out.append("\n".join(block))
    return out
