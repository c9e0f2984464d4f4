"""Content addresses for model weights: a manifest of hash-verified chunks, and folders rebuilt from them.

The one idea: a model is a list of tensors, each tensor a run of fixed-size chunks, each chunk named by
the sha256 of its bytes. Whoever holds a chunk can hand it to anyone, and the receiver checks it against
its name before it writes a byte, so it needs to trust the *manifest* only, never the peer that sent the
bytes.

- **Chunks.** Chunk ``k`` of a tensor is bytes ``[k*C, (k+1)*C)`` of its raw little-endian data exactly
  as safetensors stores it (``C`` = :data:`CHUNK_BYTES`, 1 MiB). Chunks never span tensors, so a layer
  range is fetched without its neighbours' bytes. The model's small files (``config.json``, tokenizer,
  chat template) are chunked the same way.
- **Manifest.** The model's name, its content hash (``weights.sha256`` of the source folder), its layer
  count, the chunk size, then per tensor ``[name, safetensors dtype, shape, [chunk addresses]]`` and per
  file ``[name, size, [chunk addresses]]``. It is encoded canonically (msgpack, sorted keys), so every
  peer holding the same weights derives the same bytes, and its address, the **manifest id**, is the
  sha256 of those bytes. It is not signed here: a provider signs it by naming its id in its DHT record
  (``serve/weights_sync.py``).
- **Parts** are what peers hold and fetch: ``embed`` (``model.embed_tokens.*``), ``layer.<i>``
  (``model.layers.<i>.*``), ``head`` (``model.norm.*``, ``lm_head.*``) and ``other``. A shard
  ``[start, end)`` needs its layers, ``embed`` when it is first, ``head`` when it is last, and ``embed``
  again when it is last and the head is the tied embedding (no ``lm_head.weight``).
- **Synced folder.** A peer that fetched weights keeps the manifest (:data:`SYNCED_MANIFEST`), the small
  files, ``weights.sha256`` (the manifest's content hash) and one safetensors file per complete part,
  ``part-<part>.safetensors``. A part file appears only by an atomic rename once every one of its chunks
  passed its hash, so a part file that exists is complete. The loader reads such a folder as the whole
  model whose missing parts are known (names, shapes, sizes) but absent.

Decoding treats every byte as hostile: the manifest's bytes must hash to the id asked for and re-encode
to themselves (one canonical form per manifest), sizes and counts are bounded, dtypes come from an
allow-list, every tensor's chunk count equals what its dtype and shape require, names are unique, file
names are plain names with an allowed suffix. No pickle anywhere: tensors travel and rest as raw bytes
plus dtype and shape.

Why not whole-file hashes (BitTorrent v1 style pieces across the file): a peer assigned 3 of 30 layers
would have to fetch, or at least hash, bytes it does not need, and one bad byte would cost the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

KIND = "gradient-nb/model-manifest"
VERSION = 1
CHUNK_BYTES = 1 << 20
SYNCED_MANIFEST = "mesh-manifest.msgpack"  # its presence makes a folder a synced folder
HASH_FILE = "weights.sha256"
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSORS = 200_000
MAX_FILES = 64
MAX_FILE_BYTES = 64 << 20
MAX_NAME_LEN = 256
MAX_DIMS = 8
MAX_SAFETENSORS_HEADER = 100 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Small files worth carrying: configs, tokenizers, templates. Never code, never pickles.
FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class ManifestError(ValueError):
    """A manifest (or a file it describes) that is malformed, inconsistent or not the one asked for."""


def valid_model_name(name: object) -> bool:
    """Whether ``name`` is a plain model name (what a manifest and a DHT key may name)."""
    return isinstance(name, str) and bool(_MODEL_NAME.fullmatch(name))


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def part_of(tensor_name: str) -> str:
    """The part a tensor belongs to (see the module doc)."""
    m = _LAYER.match(tensor_name)
    if m:
        return f"layer.{int(m.group(1))}"
    if tensor_name.startswith("model.embed_tokens."):
        return "embed"
    if tensor_name.startswith(("model.norm.", "lm_head.")):
        return "head"
    return "other"


def part_file(part: str) -> str:
    return f"part-{part}.safetensors"


def _n_chunks(nbytes: int, chunk_bytes: int) -> int:
    return math.ceil(nbytes / chunk_bytes)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string (F32, BF16, ...)
    shape: tuple[int, ...]
    chunks: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def part(self) -> str:
        return part_of(self.name)


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    model: str
    content_hash: str
    num_layers: int
    chunk_bytes: int
    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...]
    raw: bytes  # the canonical encoding; sha256(raw) is the id

    @property
    def id(self) -> str:
        return sha256_hex(self.raw)

    def parts(self) -> dict[str, list[TensorEntry]]:
        out: dict[str, list[TensorEntry]] = {}
        for t in self.tensors:
            out.setdefault(t.part, []).append(t)
        return out

    def part_bytes(self, part: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.part == part)

    def parts_for_layers(self, start: int, end: int) -> list[str]:
        """The parts a shard ``[start, end)`` loads (see the module doc)."""
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not inside the model's 0..{self.num_layers}")
        have = self.parts()
        out = [f"layer.{i}" for i in range(start, end)]
        tied_head = not any(t.name == "lm_head.weight" for t in self.tensors)
        if start == 0 or (end == self.num_layers and tied_head):
            out.append("embed")
        if end == self.num_layers:
            out.append("head")
        return [p for p in out if p in have]


def encode(model: str, content_hash: str, num_layers: int, tensors: Iterable[TensorEntry],
           files: Iterable[FileEntry], chunk_bytes: int = CHUNK_BYTES) -> Manifest:
    """The manifest of these entries, in its canonical encoding (checked as a receiver would check it)."""
    payload = {"v": VERSION, "kind": KIND, "model": model, "content_hash": content_hash,
               "num_layers": int(num_layers), "chunk_bytes": int(chunk_bytes),
               "tensors": [[t.name, t.dtype, list(t.shape), list(t.chunks)] for t in tensors],
               "files": [[f.name, int(f.size), list(f.chunks)] for f in files]}
    raw = _pack(payload)
    return decode(raw, sha256_hex(raw))


def _pack(payload: dict) -> bytes:
    return msgpack.packb(dict(sorted(payload.items())), use_bin_type=True)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode(raw: bytes, expect_id: str) -> Manifest:
    """The manifest whose canonical bytes are ``raw`` and whose id is ``expect_id``; raises ManifestError."""
    _check(isinstance(raw, bytes) and len(raw) <= MAX_MANIFEST_BYTES, "a manifest is at most 64 MiB of bytes")
    _check(sha256_hex(raw) == expect_id, "the manifest's bytes do not hash to its id")
    try:
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0,
                                  max_str_len=1 << 16, max_array_len=MAX_TENSORS, max_map_len=16)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ManifestError(f"the manifest is not msgpack: {exc}") from None
    _check(isinstance(payload, dict), "a manifest is a map")
    _check(payload.get("v") == VERSION and payload.get("kind") == KIND, "not a version-1 model manifest")
    model, content_hash = payload.get("model"), payload.get("content_hash")
    num_layers, chunk_bytes = payload.get("num_layers"), payload.get("chunk_bytes")
    _check(valid_model_name(model), "bad model name")
    _check(isinstance(content_hash, str) and bool(_HEX64.fullmatch(content_hash)), "bad content hash")
    _check(_is_int(num_layers) and 0 < num_layers <= 4096, "bad layer count")
    _check(_is_int(chunk_bytes) and 1 << 12 <= chunk_bytes <= 1 << 24, "bad chunk size")
    tensors, files = payload.get("tensors"), payload.get("files")
    _check(isinstance(tensors, list) and 0 < len(tensors) <= MAX_TENSORS, "bad tensor list")
    _check(isinstance(files, list) and len(files) <= MAX_FILES, "bad file list")
    names: set[str] = set()
    tlist = []
    for t in tensors:
        _check(isinstance(t, list) and len(t) == 4, "a tensor entry is [name, dtype, shape, chunks]")
        name, dtype, shape, chunks = t
        _check(isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN and name not in names, "bad tensor name")
        _check(dtype in DTYPE_BYTES, f"dtype {dtype!r} of {name} is not allowed")
        _check(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s) and 0 <= s < 1 << 40
                                                                          for s in shape), f"bad shape of {name}")
        entry = TensorEntry(name, dtype, tuple(shape), tuple(chunks) if isinstance(chunks, list) else ())
        _check(isinstance(chunks, list) and len(chunks) == _n_chunks(entry.nbytes, chunk_bytes)
               and all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks), f"bad chunk list of {name}")
        part = entry.part
        _check(not part.startswith("layer.") or int(part[6:]) < num_layers, f"{name} is beyond the layer count")
        names.add(name)
        tlist.append(entry)
    flist = []
    fnames: set[str] = set()
    for f in files:
        _check(isinstance(f, list) and len(f) == 3, "a file entry is [name, size, chunks]")
        name, size, chunks = f
        _check(_safe_file_name(name) and name not in fnames, f"bad file name {name!r}")
        _check(_is_int(size) and 0 <= size <= MAX_FILE_BYTES, f"bad size of {name}")
        _check(isinstance(chunks, list) and len(chunks) == _n_chunks(size, chunk_bytes)
               and all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks), f"bad chunk list of {name}")
        fnames.add(name)
        flist.append(FileEntry(name, size, tuple(chunks)))
    _check("config.json" in fnames, "the manifest carries no config.json")
    _check(_pack(payload) == raw, "the manifest is not in its canonical encoding")
    return Manifest(model, content_hash, num_layers, chunk_bytes, tuple(tlist), tuple(flist), raw)


def _safe_file_name(name: object) -> bool:
    return (isinstance(name, str) and bool(_FILE_NAME.fullmatch(name)) and name.endswith(FILE_SUFFIXES)
            and name not in (SYNCED_MANIFEST, HASH_FILE) and name != "model.safetensors.index.json")


# ------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(path: Path) -> list[StoredTensor]:
    """The tensors of a local safetensors file with their absolute byte ranges (header only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ManifestError(f"{path} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ManifestError(f"{path} has a bad safetensors header length")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: the safetensors header is not a map")
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        if dtype not in DTYPE_BYTES or not 0 <= a <= b <= size - 8 - n or \
                b - a != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ManifestError(f"{path}: bad entry for {name}")
        out.append(StoredTensor(name, dtype, shape, 8 + n + a, b - a))
    return sorted(out, key=lambda t: t.offset)


def _chunk_hashes(fd: int, offset: int, nbytes: int, chunk_bytes: int) -> Iterator[tuple[str, int, int]]:
    """(address, absolute offset, length) of each chunk of the byte range."""
    for k in range(_n_chunks(nbytes, chunk_bytes)):
        start = offset + k * chunk_bytes
        length = min(chunk_bytes, nbytes - k * chunk_bytes)
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise ManifestError("a weights file is shorter than its header says")
        yield sha256_hex(data), start, length


Location = tuple[Path, int, int]  # file, absolute offset, length


def build_manifest(folder: Path, model: str, weight_files: list[Path], content_hash: str, num_layers: int,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[Manifest, dict[str, Location]]:
    """Hash a local model folder into its manifest, and where each chunk lies (for serving it)."""
    where: dict[str, Location] = {}
    tensors: list[TensorEntry] = []
    for wf in weight_files:
        fd = os.open(wf, os.O_RDONLY)
        try:
            for st in read_safetensors_header(wf):
                chunks = []
                for h, off, length in _chunk_hashes(fd, st.offset, st.nbytes, chunk_bytes):
                    chunks.append(h)
                    where.setdefault(h, (wf, off, length))
                tensors.append(TensorEntry(st.name, st.dtype, st.shape, tuple(chunks)))
        finally:
            os.close(fd)
    files: list[FileEntry] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not _safe_file_name(p.name) or p.stat().st_size > MAX_FILE_BYTES:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            for h, off, length in _chunk_hashes(fd, 0, size, chunk_bytes):
                chunks.append(h)
                where.setdefault(h, (p, off, length))
        finally:
            os.close(fd)
        files.append(FileEntry(p.name, size, tuple(chunks)))
    manifest = encode(model, content_hash, num_layers, tensors, files, chunk_bytes)
    return manifest, where


def locate_chunks(folder: Path, manifest: Manifest, weight_files: list[Path]) -> tuple[dict[str, Location], set[str]]:
    """Where this folder holds each of the manifest's chunks (from the files' headers, without re-hashing)
    and the parts it holds completely. A file whose tensors disagree with the manifest is ignored."""
    by_name = {t.name: t for t in manifest.tensors}
    where: dict[str, Location] = {}
    present: set[str] = set()
    for wf in weight_files:
        for st in read_safetensors_header(wf):
            entry = by_name.get(st.name)
            if entry is None or entry.dtype != st.dtype or entry.shape != st.shape:
                continue
            present.add(st.name)
            c = manifest.chunk_bytes
            for k, h in enumerate(entry.chunks):
                where.setdefault(h, (wf, st.offset + k * c, min(c, st.nbytes - k * c)))
    for f in manifest.files:
        p = folder / f.name
        if p.is_file() and p.stat().st_size == f.size:
            c = manifest.chunk_bytes
            for k, h in enumerate(f.chunks):
                where.setdefault(h, (p, k * c, min(c, f.size - k * c)))
    parts = {part for part, ts in manifest.parts().items() if all(t.name in present for t in ts)}
    return where, parts


# ---------------------------------------------------------------------------------- synced folders


def is_synced(folder: Path) -> bool:
    return (folder / SYNCED_MANIFEST).is_file()


def read_synced(folder: Path) -> Manifest:
    """The manifest of a synced folder (checked again: it is only as good as the disk it sits on)."""
    raw = (folder / SYNCED_MANIFEST).read_bytes()
    return decode(raw, sha256_hex(raw))


def present_parts(folder: Path, manifest: Manifest) -> set[str]:
    return {p for p in manifest.parts() if (folder / part_file(p)).is_file()}


class PartWriter:
    """Builds ``part-<part>.safetensors`` from verified chunks: a temporary file of the final size, each
    chunk written at its place, renamed into place by :meth:`finish` once every chunk has arrived."""

    def __init__(self, folder: Path, part: str, tensors: list[TensorEntry], chunk_bytes: int) -> None:
        header: dict[str, dict] = {}
        pos = 0
        self._offsets: dict[str, int] = {}
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            self._offsets[t.name] = pos
            pos += t.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        self._data_start = 8 + len(text)
        self.chunk_bytes = chunk_bytes
        self.final = folder / part_file(part)
        self.tmp = folder / f".{part_file(part)}.{os.getpid()}.tmp"
        self.remaining = sum(len(t.chunks) for t in tensors)
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._data_start + pos)
        os.pwrite(self._fd, struct.pack("<Q", len(text)) + text, 0)

    def write(self, tensor: str, k: int, data: bytes) -> None:
        os.pwrite(self._fd, data, self._data_start + self._offsets[tensor] + k * self.chunk_bytes)
        self.remaining -= 1

    def finish(self) -> Path:
        if self.remaining:
            raise ManifestError(f"{self.final.name}: {self.remaining} chunks missing")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)
