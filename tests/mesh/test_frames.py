"""The wire format: round trips, and every malformed frame is refused with BadFrame (never anything worse)."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradient_nb.mesh import frames
from gradient_nb.mesh.errors import BadFrame
from gradient_nb.mesh.frames import DTYPES, Frame, FrameLimits, Message, decode_frame, encode_frame

LIMITS = FrameLimits()


def _round_trip(frame: Frame, limits: FrameLimits = LIMITS) -> Frame:
    return decode_frame(encode_frame(frame, limits), limits)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def _frame_with(head: dict, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(head, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed + payload


def _call_head(**extra: object) -> dict:
    return {"v": 1, "kind": "call", "id": 7, "method": "m", **extra}


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_every_allowed_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        t = torch.rand(5, 3, generator=gen) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(5, 3, generator=gen) * 100).to(dtype)
        t[0, 0] = float("nan")
        t[0, 1] = float("-inf")
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (5, 3), generator=gen, dtype=dtype)
    out = _round_trip(Frame("reply", 1, message=Message({}, {"t": t}))).message.tensors["t"]
    assert _same(out, t)


def test_header_fields_and_odd_tensors_round_trip() -> None:
    tensors = {
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
        "strided": torch.arange(20, dtype=torch.int16)[::3],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7, dtype=torch.bfloat16),
        "odd": torch.tensor([True, False, True]),  # 3 bytes, so the next tensor needs padding
        "after_odd": torch.tensor([1.0, 2.0], dtype=torch.float32),
        "expanded": torch.tensor([1, 2], dtype=torch.int64).expand(3, 2),
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    frame = Frame("call", 123, method="svc.m", deadline=2.5,
                  message=Message({"a": 1, "b": [1, "x", b"\x00", None, 2.5, {"n": True}]}, tensors))
    out = _round_trip(frame)
    assert (out.kind, out.call_id, out.method, out.deadline) == ("call", 123, "svc.m", 2.5)
    assert out.message.header == frame.message.header
    assert list(out.message.tensors) == list(tensors)
    for name, t in tensors.items():
        assert _same(out.message.tensors[name], t.detach()), name
    # Decoded tensors are writable and laid out contiguously.
    out.message.tensors["after_odd"].add_(1)
    assert out.message.tensors["transposed"].is_contiguous()


def test_control_frames_round_trip() -> None:
    assert _round_trip(Frame("credit", 5, credit=16)).credit == 16
    err = _round_trip(Frame("error", 9, code="ValueError", error="bad thing"))
    assert (err.code, err.error) == ("ValueError", "bad thing")
    assert _round_trip(Frame("cancel", 2**63 - 1)).call_id == 2**63 - 1


def test_big_endian_host_swaps_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bytes on the wire are little-endian. Pretending to be a big-endian host must swap each element on
    # encode and decode (so two big-endian hosts round trip), and differ from the little-endian reading.
    t = torch.arange(6, dtype=torch.int32) * 0x01020304
    le_frame = encode_frame(Frame("reply", 1, message=Message({}, {"t": t})))
    monkeypatch.setattr(frames, "_HOST_LITTLE", False)
    be_frame = encode_frame(Frame("reply", 1, message=Message({}, {"t": t})))
    assert be_frame != le_frame
    assert torch.equal(decode_frame(be_frame, LIMITS).message.tensors["t"], t)
    swapped = decode_frame(le_frame, LIMITS).message.tensors["t"]
    assert torch.equal(swapped.view(torch.uint8).reshape(-1, 4).flip(1).reshape(-1).view(torch.int32), t)


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_frame(Frame("reply", 1, message=Message({}, {"c": torch.zeros(2, dtype=torch.complex64)})))
    with pytest.raises(TypeError):
        encode_frame(Frame("reply", 1, message=Message({"x": object()})))
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(Frame("reply", 1, message=Message({}, {"t": torch.zeros(300)})),
                     FrameLimits(max_frame_bytes=1000))
    with pytest.raises(ValueError, match="kind"):
        encode_frame(Frame("bogus", 1))
    with pytest.raises(ValueError, match="dense"):
        encode_frame(Frame("reply", 1, message=Message({}, {"s": torch.eye(2).to_sparse()})))


def _desc(**over: object) -> dict:
    d = {"name": "t", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8, "order": "<"}
    d.update(over)
    return d


BAD_FRAMES = {
    "empty": (b"", "shorter"),
    "short prefix": (b"\x00\x00", "shorter"),
    "header past end": (b"\x00\x00\x00\x10abc", "past the end"),
    "header too long": ((2 << 20).to_bytes(4, "big") + b"x", "exceeds the limit"),
    "not msgpack": (b"\x00\x00\x00\x02\xc1\xc1", "msgpack"),
    "trailing msgpack": (b"\x00\x00\x00\x02\x01\x02", "msgpack"),
    "header not a map": (_frame_with([1, 2]), "not a map"),
    "ext type": (b"\x00\x00\x00\x03\xd4\x05\x00", "msgpack"),
    "no version": (_frame_with({"kind": "call", "id": 1, "method": "m"}), "version"),
    "unknown kind": (_frame_with({"v": 1, "kind": "exec", "id": 1}), "kind"),
    "bad id": (_frame_with({"v": 1, "kind": "call", "id": -1, "method": "m"}), "call id"),
    "bool id": (_frame_with({"v": 1, "kind": "call", "id": True, "method": "m"}), "call id"),
    "call without method": (_frame_with({"v": 1, "kind": "call", "id": 1}), "method"),
    "method not str": (_frame_with(_call_head(method=5)), "method"),
    "nan deadline": (_frame_with(_call_head(deadline=math.nan)), "deadline"),
    "negative deadline": (_frame_with(_call_head(deadline=-1.0)), "deadline"),
    "header not map": (_frame_with(_call_head(header=[1])), "user header"),
    "header bytes keys": (_frame_with(_call_head(header={b"k": 1})), "user header"),
    "negative credit": (_frame_with({"v": 1, "kind": "credit", "id": 1, "credit": -5}), "credit"),
    "tensors not list": (_frame_with(_call_head(tensors={"t": 1})), "list"),
    "tensor not map": (_frame_with(_call_head(tensors=[1])), "not a map"),
    "bad dtype": (_frame_with(_call_head(tensors=[_desc(dtype="object")]), bytes(8)), "dtype"),
    "pickle dtype": (_frame_with(_call_head(tensors=[_desc(dtype="torch.float32")]), bytes(8)), "dtype"),
    "big endian": (_frame_with(_call_head(tensors=[_desc(order=">")]), bytes(8)), "byte order"),
    "too many dims": (_frame_with(_call_head(tensors=[_desc(shape=[1] * 9, nbytes=4)]), bytes(4)), "dims"),
    "negative dim": (_frame_with(_call_head(tensors=[_desc(shape=[-2], nbytes=8)]), bytes(8)), "dimension"),
    "float dim": (_frame_with(_call_head(tensors=[_desc(shape=[2.0])]), bytes(8)), "dimension"),
    "wrong nbytes": (_frame_with(_call_head(tensors=[_desc(nbytes=4)]), bytes(4)), "needs 8"),
    "huge shape": (_frame_with(_call_head(tensors=[_desc(shape=[1 << 25, 1 << 25])]), bytes(8)), "needs"),
    "past payload": (_frame_with(_call_head(tensors=[_desc()]), bytes(4)), "nbytes"),
    "offset past payload": (_frame_with(_call_head(tensors=[_desc(offset=20)]), bytes(12)), "offset"),
    "ends past payload": (_frame_with(_call_head(tensors=[_desc(offset=8)]), bytes(12)), "past the 12-byte"),
    "overlap": (_frame_with(_call_head(tensors=[_desc(), _desc(name="u", offset=4)]), bytes(12)), "overlaps"),
    "duplicate name": (_frame_with(_call_head(tensors=[_desc(), _desc(offset=8)]), bytes(16)), "duplicate"),
    "trailing bytes": (_frame_with(_call_head(tensors=[_desc()]), bytes(9)), "unaccounted"),
    "payload, no tensors": (_frame_with(_call_head(), b"xyz"), "unaccounted"),
    "gap": (_frame_with(_call_head(tensors=[_desc(offset=100)]), bytes(108)), "unaccounted"),
    "too many tensors": (_frame_with(_call_head(tensors=[_desc(name=f"t{i}", shape=[0], nbytes=0)
                                                         for i in range(257)])), "exceed"),
    "name not str": (_frame_with(_call_head(tensors=[_desc(name=5)]), bytes(8)), "name"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_malformed_frames_raise_bad_frame_with_a_reason(name: str) -> None:
    data, reason = BAD_FRAMES[name]
    with pytest.raises(BadFrame, match=reason):
        decode_frame(data, LIMITS)


def test_bad_frame_keeps_the_call_id_when_readable() -> None:
    with pytest.raises(BadFrame) as info:
        decode_frame(_frame_with(_call_head(tensors=[_desc(dtype="object")]), bytes(8)), LIMITS)
    assert (info.value.call_id, info.value.kind) == (7, "call")
    with pytest.raises(BadFrame) as info:
        decode_frame(b"\x00\x00", LIMITS)
    assert info.value.call_id is None


def test_frame_over_the_size_limit_is_refused_but_its_call_id_is_known() -> None:
    data = encode_frame(Frame("call", 5, method="m", message=Message({}, {"t": torch.zeros(1000)})))
    with pytest.raises(BadFrame, match="exceeds") as info:
        decode_frame(data, FrameLimits(max_frame_bytes=2000))
    assert info.value.call_id == 5


def test_bool_bytes_are_normalised() -> None:
    data = _frame_with({"v": 1, "kind": "reply", "id": 1,
                        "tensors": [{"name": "b", "dtype": "bool", "shape": [3], "offset": 0, "nbytes": 3}]},
                       b"\x00\x07\x01")
    out = decode_frame(data, LIMITS).message.tensors["b"]
    assert out.tolist() == [False, True, True]
    assert out.view(torch.uint8).tolist() == [0, 1, 1]


def test_unaligned_tensor_from_another_encoder_is_copied_aligned() -> None:
    payload = b"\x00" + torch.tensor([1.5, -2.0], dtype=torch.float32).numpy().tobytes()
    data = _frame_with({"v": 1, "kind": "reply", "id": 1, "tensors": [
        {"name": "pad", "dtype": "uint8", "shape": [1], "offset": 0, "nbytes": 1},
        {"name": "f", "dtype": "float32", "shape": [2], "offset": 1, "nbytes": 8}]}, payload)
    out = decode_frame(data, LIMITS).message.tensors["f"]
    assert out.tolist() == [1.5, -2.0]
    assert out.data_ptr() % 4 == 0


def test_decoded_tensors_do_not_alias_the_input_buffer() -> None:
    t = torch.arange(4, dtype=torch.int32)
    data = bytearray(encode_frame(Frame("reply", 1, message=Message({}, {"t": t}))))
    out = decode_frame(bytes(data), LIMITS).message.tensors["t"]
    data[-4:] = b"\xff\xff\xff\xff"
    assert out.tolist() == [0, 1, 2, 3]


# -- property-based ------------------------------------------------------------------------------------

_header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=10,
)


@st.composite
def _tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    n = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return (t.view(torch.uint8) != 0) if dtype == torch.bool else t.clone()


@st.composite
def _frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(sorted(frames.KINDS)))
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True))
    tensors = {n: draw(_tensors()) for n in names}
    header = draw(st.dictionaries(st.text(max_size=5), _header_values, max_size=4))
    return Frame(kind, draw(st.integers(0, 2**63 - 1)),
                 method=draw(st.text(min_size=1, max_size=10)) if kind in ("call", "stream-call") else "",
                 deadline=draw(st.none() | st.floats(0, 1e6)), message=Message(header, tensors),
                 credit=draw(st.integers(0, 1000)), code=draw(st.text(max_size=10)), error=draw(st.text(max_size=20)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=_frames())
def test_any_valid_frame_round_trips(frame: Frame) -> None:
    out = _round_trip(frame)
    assert (out.kind, out.call_id, out.method, out.credit, out.code, out.error) == (
        frame.kind, frame.call_id, frame.method, frame.credit, frame.code, frame.error)
    assert out.deadline == frame.deadline
    assert out.message.header == frame.message.header
    assert list(out.message.tensors) == list(frame.message.tensors)
    for name, t in frame.message.tensors.items():
        assert _same(out.message.tensors[name], t), name


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_do_worse_than_bad_frame(data: bytes) -> None:
    try:
        frame = decode_frame(data, LIMITS)
    except BadFrame:
        return
    assert frame.kind in frames.KINDS  # the rare random input that happens to be a valid frame


_SEED_FRAME = encode_frame(Frame("call", 42, method="svc.echo", deadline=5.0, message=Message(
    {"x": [1, 2, 3], "s": "hello"},
    {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([True, False]),
     "c": torch.arange(3, dtype=torch.bfloat16)})))


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_SEED_FRAME) - 1), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.integers(0, len(_SEED_FRAME)), extra=st.binary(max_size=16))
def test_mutated_valid_frames_decode_or_raise_bad_frame(edits: list[tuple[int, int]], cut: int,
                                                        extra: bytes) -> None:
    data = bytearray(_SEED_FRAME)
    for pos, value in edits:
        data[pos] = value
    data = data[:cut] + extra
    assume(bytes(data) != _SEED_FRAME)
    try:
        frame = decode_frame(bytes(data), LIMITS)
    except BadFrame:
        return
    # A mutation that still decodes must still satisfy every invariant of a frame.
    assert frame.kind in frames.KINDS
    total = 0
    for t in frame.message.tensors.values():
        assert t.dtype in DTYPES.values()
        total += t.numel() * t.element_size()
    assert total <= len(data)


@settings(max_examples=100, deadline=None)
@given(head=st.dictionaries(st.sampled_from(["v", "kind", "id", "method", "deadline", "header", "tensors",
                                              "credit", "code", "error"]),
                            _header_values | st.just(1) | st.sampled_from(sorted(frames.KINDS)), max_size=10),
       payload=st.binary(max_size=64))
def test_random_headers_never_do_worse_than_bad_frame(head: dict, payload: bytes) -> None:
    try:
        decode_frame(_frame_with(head, payload), LIMITS)
    except BadFrame:
        pass
