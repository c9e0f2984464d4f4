"""The RPC wire format: a msgpack header plus raw tensor bytes. Nothing in a frame is ever executed.

One frame is::

    [4-byte big-endian header length][msgpack header][payload: raw tensor bytes]

The header is a map::

    {"v": 1, "kind": str, "id": int, "method": str, "deadline": float | None,
     "header": {user header}, "credit": int, "code": str, "error": str,
     "tensors": [{"name", "dtype", "shape", "offset", "nbytes", "order": "<"}, ...]}

(fields that are empty are left out). Tensor offsets count from the start of the payload. Tensor bytes are
little-endian whatever the host, contiguous, and placed at offsets aligned to :data:`ALIGN` so the receiver
can view them in place.

Decoding treats every byte as hostile: the header must be a map of the expected shape, the dtype comes
from an allow-list, every declared length must equal dtype size x shape, every tensor must lie inside the
payload without overlapping another, and counts and sizes are bounded by :class:`FrameLimits`. Tensors are
built with ``torch.frombuffer`` on a private copy of the payload. Any violation raises :class:`BadFrame`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .errors import BadFrame

VERSION = 1
ALIGN = 64
KINDS = frozenset({"call", "stream-call", "reply", "stream-item", "stream-end", "error", "cancel", "credit"})
MAX_CALL_ID = (1 << 63) - 1
MAX_NAME_LEN = 256
MAX_ERROR_LEN = 4096

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Tensor bytes on the wire are little-endian. On a big-endian host they are swapped on the way in and out.
_HOST_LITTLE = sys.byteorder == "little"


@dataclass
class FrameLimits:
    max_frame_bytes: int = 64 << 20
    max_header_bytes: int = 1 << 20
    max_tensors: int = 256
    max_dims: int = 8


@dataclass
class Message:
    """What a call carries: a msgpack-able header (str/int/float/bool/None/bytes/list/dict with str keys)
    and named tensors."""

    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Frame:
    """One decoded frame. ``deadline`` is the caller's remaining time in seconds (calls only)."""

    kind: str
    call_id: int
    method: str = ""
    deadline: float | None = None
    message: Message = field(default_factory=Message)
    credit: int = 0
    code: str = ""
    error: str = ""


def _swap_bytes(raw: memoryview | bytes, itemsize: int) -> bytes:
    import numpy as np

    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    return arr[:, ::-1].tobytes()


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    """The tensor's elements as little-endian bytes in C order (copies only when it must)."""
    if t.layout != torch.strided:
        raise ValueError(f"only dense tensors can be sent, not {t.layout}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    raw = memoryview(t.view(torch.uint8).numpy()).cast("B")
    if not _HOST_LITTLE and t.element_size() > 1:
        return _swap_bytes(raw, t.element_size())
    return raw


def encode_frame(frame: Frame, limits: FrameLimits | None = None) -> bytes:
    """The bytes of ``frame``. Raises ValueError/TypeError for what cannot be sent (an unsupported dtype,
    a header msgpack cannot encode, a frame over ``limits``)."""
    if frame.kind not in KINDS:
        raise ValueError(f"unknown frame kind {frame.kind!r}")
    if not 0 <= frame.call_id <= MAX_CALL_ID:
        raise ValueError(f"call id {frame.call_id} out of range")
    msg = frame.message
    if not isinstance(msg.header, dict):
        raise TypeError("Message.header must be a dict")
    descs: list[dict[str, Any]] = []
    chunks: list[memoryview | bytes] = []
    offset = 0
    for name, t in msg.tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise ValueError(f"bad tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the wire format does not carry "
                             f"(allowed: {', '.join(DTYPES)})")
        pad = -offset % ALIGN
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        raw = _tensor_bytes(t)
        nbytes = len(raw)
        chunks.append(raw)
        descs.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset,
                      "nbytes": nbytes, "order": "<"})
        offset += nbytes
    head: dict[str, Any] = {"v": VERSION, "kind": frame.kind, "id": frame.call_id}
    if frame.method:
        head["method"] = frame.method
    if frame.deadline is not None:
        head["deadline"] = float(frame.deadline)
    if msg.header:
        head["header"] = msg.header
    if descs:
        head["tensors"] = descs
    if frame.credit:
        head["credit"] = int(frame.credit)
    if frame.code:
        head["code"] = frame.code
    if frame.error:
        head["error"] = frame.error[:MAX_ERROR_LEN]
    packed = msgpack.packb(head, use_bin_type=True, strict_types=False)
    if limits is not None:
        if len(packed) > limits.max_header_bytes:
            raise ValueError(f"frame header of {len(packed)} bytes exceeds the limit of {limits.max_header_bytes}")
        if len(descs) > limits.max_tensors:
            raise ValueError(f"{len(descs)} tensors exceed the limit of {limits.max_tensors}")
        total = 4 + len(packed) + offset
        if total > limits.max_frame_bytes:
            raise ValueError(f"frame of {total} bytes exceeds the limit of {limits.max_frame_bytes}")
    return b"".join([len(packed).to_bytes(4, "big"), packed, *chunks])


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _int(value: Any, what: str, lo: int, hi: int, **ids: Any) -> int:
    # bool is an int subclass; a header saying shape [True] is malformed, not shape [1].
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadFrame(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.60}", **ids)
    return value


def decode_frame(data: bytes, limits: FrameLimits) -> Frame:
    """Parse and check one frame; raises :class:`BadFrame` (with ``call_id`` when it could be read)."""
    n = len(data)
    if n < 4:
        raise BadFrame(f"frame of {n} bytes is shorter than its 4-byte length prefix")
    hlen = int.from_bytes(data[:4], "big")
    if hlen > limits.max_header_bytes:
        raise BadFrame(f"header length {hlen} exceeds the limit of {limits.max_header_bytes}")
    if 4 + hlen > n:
        raise BadFrame(f"header length {hlen} runs past the end of a {n}-byte frame")
    try:
        head = msgpack.unpackb(memoryview(data)[4:4 + hlen], raw=False, strict_map_key=True, ext_hook=_reject_ext,
                               use_list=True)
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, StackError, ...)
        raise BadFrame(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(head, dict):
        raise BadFrame(f"header is a {type(head).__name__}, not a map")
    kind, call_id = head.get("kind"), head.get("id")
    if not isinstance(kind, str):
        kind = None  # an unhashable kind (a list, a map) must not reach the set lookups below
    ids: dict[str, Any] = {}
    if isinstance(call_id, int) and not isinstance(call_id, bool) and 0 <= call_id <= MAX_CALL_ID:
        ids["call_id"] = call_id
    if kind in KINDS:
        ids["kind"] = kind
    if head.get("v") != VERSION:
        raise BadFrame(f"unsupported frame version {head.get('v')!r:.20}", **ids)
    if kind not in KINDS:
        raise BadFrame(f"unknown frame kind {kind!r:.40}", **ids)
    if "call_id" not in ids:
        raise BadFrame(f"bad call id {call_id!r:.40}", **ids)
    if n > limits.max_frame_bytes:
        raise BadFrame(f"frame of {n} bytes exceeds the limit of {limits.max_frame_bytes}", **ids)

    method = head.get("method", "")
    if not isinstance(method, str) or len(method) > MAX_NAME_LEN:
        raise BadFrame("method must be a short string", **ids)
    if kind in ("call", "stream-call") and not method:
        raise BadFrame(f"a {kind} frame needs a method", **ids)
    deadline = head.get("deadline")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not math.isfinite(deadline) or deadline < 0):
        raise BadFrame(f"deadline must be a finite number of seconds >= 0, got {deadline!r:.40}", **ids)
    user = head.get("header", {})
    if not isinstance(user, dict) or not all(isinstance(k, str) for k in user):
        raise BadFrame("the user header must be a map with string keys", **ids)
    credit = _int(head.get("credit", 0), "credit", 0, MAX_CALL_ID, **ids)
    code, error = head.get("code", ""), head.get("error", "")
    if not isinstance(code, str) or len(code) > MAX_NAME_LEN or not isinstance(error, str):
        raise BadFrame("error code and message must be strings", **ids)

    tensors = _decode_tensors(data, 4 + hlen, head.get("tensors", []), limits, ids)
    return Frame(kind=kind, call_id=call_id, method=method,
                 deadline=float(deadline) if deadline is not None else None,
                 message=Message(user, tensors), credit=credit, code=code, error=error[:MAX_ERROR_LEN])


def _decode_tensors(data: bytes, start: int, descs: Any, limits: FrameLimits,
                    ids: dict[str, Any]) -> dict[str, torch.Tensor]:
    payload_len = len(data) - start
    if not isinstance(descs, list):
        raise BadFrame("tensors must be a list", **ids)
    if len(descs) > limits.max_tensors:
        raise BadFrame(f"{len(descs)} tensors exceed the limit of {limits.max_tensors}", **ids)
    checked: list[tuple[str, torch.dtype, list[int], int, int]] = []
    for i, d in enumerate(descs):
        if not isinstance(d, dict):
            raise BadFrame(f"tensor #{i} is not a map", **ids)
        name, dtype_name, shape = d.get("name"), d.get("dtype"), d.get("shape")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise BadFrame(f"tensor #{i} has a bad name", **ids)
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise BadFrame(f"tensor {name!r} has dtype {dtype_name!r:.40}, not one of {', '.join(DTYPES)}",
                           **ids)
        if d.get("order", "<") != "<":
            raise BadFrame(f"tensor {name!r} has byte order {d.get('order')!r:.10}; only '<' is used", **ids)
        if not isinstance(shape, list) or len(shape) > limits.max_dims:
            raise BadFrame(f"tensor {name!r} needs a shape list of at most {limits.max_dims} dims", **ids)
        dims = [_int(s, f"dimension of tensor {name!r}", 0, limits.max_frame_bytes, **ids) for s in shape]
        offset = _int(d.get("offset"), f"offset of tensor {name!r}", 0, payload_len, **ids)
        nbytes = _int(d.get("nbytes"), f"nbytes of tensor {name!r}", 0, payload_len, **ids)
        dtype = DTYPES[dtype_name]
        expected = math.prod(dims) * dtype.itemsize
        if nbytes != expected:
            raise BadFrame(f"tensor {name!r} declares {nbytes} bytes but {dtype_name}{dims} needs {expected}",
                           **ids)
        if offset + nbytes > payload_len:
            raise BadFrame(f"tensor {name!r} ends at {offset + nbytes}, past the {payload_len}-byte payload",
                           **ids)
        checked.append((name, dtype, dims, offset, nbytes))
    if len({c[0] for c in checked}) != len(checked):
        raise BadFrame("duplicate tensor names", **ids)
    end = 0
    for name, _, _, offset, nbytes in sorted(checked, key=lambda c: (c[3], c[4])):
        if offset < end:
            raise BadFrame(f"tensor {name!r} overlaps the tensor before it", **ids)
        if offset - end >= ALIGN:
            raise BadFrame(f"{offset - end} unaccounted bytes before tensor {name!r}", **ids)
        end = max(end, offset + nbytes)
    if end != payload_len:
        raise BadFrame(f"{payload_len - end} unaccounted bytes after the last tensor", **ids)

    out: dict[str, torch.Tensor] = {}
    if not checked:
        return out
    # One private, writable copy of the payload: the sender's buffer may be reused, and frombuffer on
    # read-only bytes would give tensors that must not be written.
    buf = bytearray(memoryview(data)[start:])
    for name, dtype, dims, offset, nbytes in checked:
        if nbytes == 0:
            out[name] = torch.empty(dims, dtype=dtype)
            continue
        raw = torch.frombuffer(buf, dtype=torch.uint8, offset=offset, count=nbytes)
        if not _HOST_LITTLE and dtype.itemsize > 1:
            raw = torch.frombuffer(bytearray(_swap_bytes(memoryview(buf)[offset:offset + nbytes],
                                                         dtype.itemsize)), dtype=torch.uint8)
        elif offset % ALIGN:
            raw = raw.clone()  # a foreign encoder's unaligned offset: give the tensor aligned storage
        if dtype == torch.bool:
            # Bytes other than 0/1 in a bool tensor are undefined behaviour in torch: normalise them.
            t = raw != 0
        else:
            t = raw.view(dtype)
        out[name] = t.reshape(dims)
    return out
