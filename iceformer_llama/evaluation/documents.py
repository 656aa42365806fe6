"""Eval's documents: one source each (sources.py), deduplicated, cut to a length in tokens; or a user's file.

A document of n tokens is BOS (when the model uses one) and the first tokens of its source's kept
paragraphs, joined by blank lines in the source's order: one source per document keeps it coherent.

Deduplication runs once over the whole catalogue, in its order (so tune and report share no paragraph):
- a paragraph is dropped when it repeats one kept before in the same document (exact, after lowercasing
  and keeping only word characters);
- a paragraph of at least MIN_WORDS words is also dropped when such a paragraph was kept anywhere
  before (exact), or when at least NEAR_DUPLICATE of its SHINGLE-word shingles were (near duplicate);
  shorter ones (headings, one-line code blocks) only count within their own document.
copy-heavy sources are not deduplicated: their repetition is what the class measures. Nor are a user's
--text-file documents: they are scored as written.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .sources import CATALOGUE, CLASSES, Source, SourceMissing, paragraphs, read_source

MIN_WORDS = 8
SHINGLE = 5
NEAR_DUPLICATE = 0.5
_CHARS_PER_TOKEN_BOUND = 24   # tokenize a prefix this many chars per wanted token, all of it if short


def _words(paragraph: str) -> list[str]:
    return re.findall(r"\w+", paragraph.lower())


class Deduplicator:
    """Exact and near-duplicate paragraph filter; one instance spans the documents it has seen."""

    def __init__(self):
        self.keys: set[str] = set()
        self.shingles: set[tuple[str, ...]] = set()

    def filter(self, paras: list[str]) -> tuple[list[str], int, int]:
        """(kept paragraphs of one document, dropped as exact repeats, dropped as near duplicates)."""
        kept, local, exact, near = [], set(), 0, 0
        for p in paras:
            words = _words(p)
            key = " ".join(words) or p.strip()
            if key in local:
                exact += 1
                continue
            if len(words) >= MIN_WORDS:
                if key in self.keys:
                    exact += 1
                    continue
                sh = {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}
                if len(sh & self.shingles) >= NEAR_DUPLICATE * len(sh):
                    near += 1
                    continue
                self.keys.add(key)
                self.shingles |= sh
            local.add(key)
            kept.append(p)
        return kept, exact, near


@dataclass(frozen=True)
class Prepared:
    """A catalogue source read on this machine and deduplicated (text None when it is missing)."""
    source: Source
    text: str | None
    paragraphs: int = 0
    dropped_exact: int = 0
    dropped_near: int = 0
    missing: str | None = None

    def as_dict(self) -> dict:
        d = {**self.source.as_dict(), "paragraphs": self.paragraphs, "dropped_exact": self.dropped_exact,
             "dropped_near": self.dropped_near, "chars": len(self.text) if self.text else 0,
             "sha256": hashlib.sha256(self.text.encode()).hexdigest() if self.text else None}
        if self.missing:
            d["missing"] = self.missing
        return d


def prepare(catalogue=CATALOGUE, read=read_source) -> list[Prepared]:
    """Every source read and deduplicated, in catalogue order (read: Source -> text)."""
    dedup, out = Deduplicator(), []
    for src in catalogue:
        try:
            paras = paragraphs(read(src))
        except SourceMissing as e:
            out.append(Prepared(src, None, missing=str(e)))
            continue
        if src.klass == "copy-heavy":
            kept, exact, near = paras, 0, 0
        else:
            kept, exact, near = dedup.filter(paras)
        out.append(Prepared(src, "\n\n".join(kept), len(kept), exact, near))
    return out


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[Prepared, ...]:
    """The machine's catalogue, prepared once per process."""
    return tuple(prepare())


def select(prepared, classes, docs: str, per_class: int | None = None) -> list[Prepared]:
    """The present sources of `classes` in split `docs` (tune, report or all), the first per_class of each class."""
    chosen, count = [], {}
    for p in prepared:
        s = p.source
        if p.text is None or s.klass not in classes or (docs != "all" and s.split != docs):
            continue
        if per_class is not None and count.get(s.klass, 0) >= per_class:
            continue
        count[s.klass] = count.get(s.klass, 0) + 1
        chosen.append(p)
    return chosen


@dataclass
class Document:
    id: str
    klass: str
    split: str
    licence: str
    tokens: list[int] = field(repr=False)

    def describe(self) -> dict:
        return {"document": self.id, "class": self.klass, "split": self.split, "n_tokens": len(self.tokens)}


def cut_tokens(llm, text: str, n_tokens: int) -> list[int] | None:
    """The first n_tokens of text as the model tokenizes it (BOS first when the model uses one); None if short."""
    bound = n_tokens * _CHARS_PER_TOKEN_BOUND
    ids = llm.tokenize(text[:bound].encode("utf-8"), add_bos=True)
    if len(ids) < n_tokens and len(text) > bound:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True)
    return ids[:n_tokens] if len(ids) >= n_tokens else None


def documents_at(llm, n_tokens: int, prepared) -> tuple[list[Document], list[dict]]:
    """(documents of n_tokens, one per source long enough; the sources skipped as too short)."""
    docs, skipped = [], []
    for p in prepared:
        tokens = cut_tokens(llm, p.text, n_tokens)
        if tokens is None:
            skipped.append({"document": p.source.id, "n_tokens": n_tokens, "reason": "shorter than the length"})
            continue
        docs.append(Document(p.source.id, p.source.klass, p.source.split, p.source.licence, tokens))
    return docs, skipped


def read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--text-file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--text-file {path}: {e.strerror or e}") from None
    if not text.strip():
        raise UsageError(f"--text-file {path} is empty")
    return text


def text_file_documents(llm, paths, n_tokens: int) -> list[Document]:
    """A user's files, each cut to n_tokens as written (UsageError when one is shorter)."""
    names = [Path(p).name for p in paths]
    docs = []
    for path, name in zip(paths, names):
        text = read_text_file(path)
        tokens = cut_tokens(llm, text, n_tokens)
        if tokens is None:
            have = len(llm.tokenize(text.encode("utf-8"), add_bos=True))
            raise UsageError(f"--text-file {path} has {have} tokens, fewer than the {n_tokens} asked for "
                             "(--lengths): give a longer file or a shorter length")
        docs.append(Document(f"file:{name if names.count(name) == 1 else path}", "user", "user", "user's own", tokens))
    return docs


def check_classes(text: str) -> list[str]:
    """--classes: comma-separated classes, all, or none (no catalogue document: tasks or --text-file only)."""
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    if wanted == ["all"]:
        return list(CLASSES)
    if wanted == ["none"]:
        return []
    unknown = [c for c in wanted if c not in CLASSES]
    if unknown or not wanted:
        raise ValueError(f"unknown class {','.join(unknown) or repr(text)}: choose from {', '.join(CLASSES)}, all or none")
    return wanted
