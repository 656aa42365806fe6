"""Check that a file is a complete GGUF model and read the few facts we need from its header.

`check_gguf(path)` returns a `GGUFInfo` or raises `ModelError` with one line that names the
problem: bad magic, unsupported version, truncated/corrupt, empty, a directory, unreadable.
The header is walked with struct over a read-only mmap (gguf.GGUFReader is the test oracle; it
takes seconds on a large vocabulary). A file cut inside the tensor data is caught by comparing the
end of the last tensor with the file size. Per-layer metadata arrays (e.g. head_count_kv on a few
non-LLaMA architectures) are skipped, so such fields read as None / default.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_HEADER_SIZE = 24  # magic u32, version u32, tensor_count u64, kv_count u64


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int  # bytes
    version: int  # GGUF format version (2 or 3)
    architecture: str  # general.architecture, e.g. "llama"
    name: str | None  # general.name, when the file has one
    n_layers: int | None  # {arch}.block_count
    context_length: int | None  # {arch}.context_length: the context the model was trained with
    embedding_length: int | None  # {arch}.embedding_length (n_embd)
    n_head: int | None  # {arch}.attention.head_count
    n_head_kv: int | None  # {arch}.attention.head_count_kv (defaults to n_head, as llama.cpp does)
    head_dim: int | None  # {arch}.attention.key_length, else embedding_length // n_head
    tensor_count: int
    data_size: int  # bytes of tensor data the header describes (end of the last tensor)


def _read_prefix(path: Path) -> tuple[int, bytes]:
    """Size and the first header bytes, with filesystem problems turned into ModelError."""
    try:
        if path.is_dir():
            raise ModelError(f"model path is a directory, not a GGUF file: {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER_SIZE)
    except ModelError:
        raise
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except PermissionError:
        raise ModelError(f"cannot read model file (permission denied): {path}") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror or e}") from None
    return size, head


class _Truncated(Exception):
    pass


# GGUF value types: size in bytes of the fixed-size ones (8: string, 9: array).
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _HeaderParser:
    """Walks the GGUF header in a read-only mmap with struct; arrays are skipped, not decoded.

    (gguf.GGUFReader builds a numpy view per array element: ~4 s for a 49k-token vocabulary.)
    """

    def __init__(self, buf, offset: int):
        self.buf, self.off, self.size = buf, offset, len(buf)

    def take(self, n: int) -> int:
        start = self.off
        if n < 0 or start + n > self.size:
            raise _Truncated(f"header entry at byte {start} runs past the end of the file")
        self.off = start + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def value(self, vtype: int):
        if vtype in _FIXED:
            return self.unpack(_FIXED[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _FIXED:
                self.take(count * struct.calcsize(_FIXED[etype]))
            elif etype == _STRING:
                for _ in range(count):
                    self.take(self.unpack("<Q"))
            else:
                for _ in range(count):  # arrays of arrays: rare, walked element by element
                    self.value(etype)
            return None
        raise _Truncated(f"unknown metadata value type {vtype} at byte {self.off}")


def _ggml_type_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise ModelError("the 'gguf' package is missing; run: python -m pip install gguf") from None
    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def _parse(buf, path: Path) -> tuple[dict, int, int, int]:
    """(scalar metadata, tensor count, data offset, end of the last tensor's data)."""
    p = _HeaderParser(buf, 8)
    n_tensors, n_kv = p.unpack("<Q"), p.unpack("<Q")
    if n_tensors > p.size or n_kv > p.size:
        raise _Truncated(f"impossible counts: {n_tensors} tensors, {n_kv} metadata keys")
    meta: dict = {}
    for _ in range(n_kv):
        key = p.string().decode("utf-8", "replace")
        value = p.value(p.unpack("<I"))
        if value is not None:
            meta[key] = value
    sizes = _ggml_type_sizes()
    tensors = []
    for _ in range(n_tensors):
        p.string()  # name
        n_dims = p.unpack("<I")
        if n_dims > 8:
            raise _Truncated(f"tensor with {n_dims} dimensions")
        n_elems = 1
        for _ in range(n_dims):
            n_elems *= p.unpack("<Q")
        ttype, toff = p.unpack("<I"), p.unpack("<Q")
        if ttype not in sizes:
            raise ModelError(f"unsupported tensor type {ttype} in {path}; update the gguf package or reconvert the model")
        block, type_size = sizes[ttype]
        tensors.append((toff, n_elems * type_size // block))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Truncated(f"invalid general.alignment {align!r}")
    data_offset = -(-p.off // align) * align
    data_end = max((data_offset + off + n for off, n in tensors), default=data_offset)
    return meta, len(tensors), data_offset, data_end


def _text(value) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Return the header facts of a GGUF file, or raise ModelError saying what is wrong with it."""
    path = Path(path)
    size, head = _read_prefix(path)
    if size == 0:
        raise ModelError(f"model file is empty: {path}; delete it and download it again")
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (bad magic): {path}")
    if len(head) < _HEADER_SIZE:
        raise ModelError(f"truncated or corrupt GGUF: {path} (file ends inside the {_HEADER_SIZE}-byte header)")
    (version,) = struct.unpack_from("<I", head, 4)
    if version & 0xFFFF == 0 and struct.unpack_from(">I", head, 4)[0] in SUPPORTED_VERSIONS:
        raise ModelError(f"big-endian GGUF is not supported: {path}; use a little-endian conversion")
    if version not in SUPPORTED_VERSIONS:
        raise ModelError(f"unsupported GGUF version {version}: {path} (supported: 2, 3); reconvert it with a current llama.cpp")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, tensor_count, data_offset, data_end = _parse(buf, path)
    except _Truncated as e:
        raise ModelError(f"truncated or corrupt GGUF: {path} ({e}); delete it and download it again") from None
    except PermissionError:
        raise ModelError(f"cannot read model file (permission denied): {path}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read model file {path}: {e}") from None

    if data_end > size:
        raise ModelError(
            f"truncated or corrupt GGUF: {path} (tensor data needs {data_end} bytes, file has {size}); "
            "delete it and download it again"
        )

    arch = _text(meta.get("general.architecture"))
    if not arch:
        raise ModelError(f"truncated or corrupt GGUF: {path} (no general.architecture key)")
    name = _text(meta.get("general.name"))
    n_embd = _int_or_none(meta.get(f"{arch}.embedding_length"))
    n_head = _int_or_none(meta.get(f"{arch}.attention.head_count"))
    n_head_kv = _int_or_none(meta.get(f"{arch}.attention.head_count_kv"))
    head_dim = _int_or_none(meta.get(f"{arch}.attention.key_length"))
    if head_dim is None and n_embd and n_head:
        head_dim = n_embd // n_head
    return GGUFInfo(
        path=path,
        file_size=size,
        version=int(version),
        architecture=arch,
        name=name,
        n_layers=_int_or_none(meta.get(f"{arch}.block_count")),
        context_length=_int_or_none(meta.get(f"{arch}.context_length")),
        embedding_length=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv if n_head_kv is not None else n_head,
        head_dim=head_dim,
        tensor_count=tensor_count,
        data_size=data_end - data_offset,
    )
