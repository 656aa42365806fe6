"""Long English documents for evaluation, taken from this machine's Python standard library.

The text is the docstrings of stdlib modules, classes and functions (Python Software Foundation
License: free to use and redistribute). Nothing is downloaded and nothing needs shipping.
"""

from __future__ import annotations

import importlib
import inspect

SOURCE = "docstrings of the Python standard library on this machine (PSF License)"

_MODULES = ("argparse", "collections", "email.message", "http.client", "json", "logging", "pathlib",
            "subprocess", "threading", "unittest.case", "urllib.request", "zipfile", "tarfile", "shutil",
            "inspect", "typing", "asyncio.events", "csv", "datetime", "decimal", "fractions", "heapq",
            "textwrap", "difflib", "calendar", "configparser", "socket", "ssl", "statistics", "random")


def _docstrings(module_name: str):
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return
    if mod.__doc__:
        yield mod.__doc__
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 200:
            yield doc


def stdlib_text(min_chars: int = 400_000) -> str:
    """Docstrings joined by blank lines, in a fixed order (deterministic for one Python version)."""
    parts: list[str] = []
    total = 0
    for name in _MODULES:
        for doc in _docstrings(name):
            parts.append(doc.strip())
            total += len(doc)
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def document_tokens(llm, n_tokens: int, *, offset_tokens: int = 0) -> list[int]:
    """n_tokens of the corpus as the model tokenizes it (BOS first when the model uses one)."""
    ids = llm.tokenize(stdlib_text().encode("utf-8"), add_bos=True)
    bos, body = ids[:1], ids[1:]
    needed = offset_tokens + n_tokens
    if len(body) < needed:
        raise ValueError(f"the corpus has {len(body)} tokens, fewer than the {needed} asked for")
    has_bos = bos and bos[0] == llm.token_bos()
    start = body[offset_tokens:offset_tokens + n_tokens - (1 if has_bos else 0)]
    return (bos + start) if has_bos else body[offset_tokens:offset_tokens + n_tokens]
