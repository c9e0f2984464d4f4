"""The weights manifest: one canonical encoding addressed by its hash; hostile bytes are refused."""

from __future__ import annotations

import msgpack
import pytest

from gradient_nb.models import manifest as mf

H = "ab" * 32


def _manifest(**over) -> mf.Manifest:
    tensors = [mf.TensorEntry("model.embed_tokens.weight", "F32", (1024, 512), (H, H)),
               mf.TensorEntry("model.layers.0.mlp.up_proj.weight", "BF16", (4, 4), (H,)),
               mf.TensorEntry("model.norm.weight", "F32", (0,), ())]
    files = [mf.FileEntry("config.json", 10, (H,))]
    args = dict(model="m", content_hash=H, num_layers=1, tensors=tensors, files=files) | over
    return mf.encode(**args)


def _repack(m: mf.Manifest, **changes) -> bytes:
    payload = msgpack.unpackb(m.raw, raw=False) | changes
    return msgpack.packb(dict(sorted(payload.items())), use_bin_type=True)


def test_canonical_manifest_round_trips_and_names_parts() -> None:
    m = _manifest()
    assert mf.decode(m.raw, m.id) == m and _manifest().id == m.id  # same entries, same id
    assert m.parts_for_layers(0, 1) == ["layer.0", "embed", "head"]  # tied head: the embedding too
    assert m.part_bytes("embed") == 1024 * 512 * 4


@pytest.mark.parametrize("change, match", [
    ({"tensors": [["model.norm.weight", "F32", [600000], [H]]]}, "chunk list"),   # 2.4 MB in one chunk
    ({"tensors": [["x", "OBJ", [1], [H]]]}, "dtype"),
    ({"tensors": [["x", "F32", [1], [H]], ["x", "F32", [1], [H]]]}, "tensor name"),
    ({"tensors": [["model.layers.7.w", "F32", [1], [H]]]}, "beyond the layer count"),
    ({"files": [["../../.bashrc.json", 1, [H]]]}, "file name"),
    ({"files": [["evil.py", 1, [H]]]}, "file name"),
    ({"files": []}, "config.json"),
    ({"kind": "something else"}, "version-1"),
])
def test_hostile_manifests_are_refused(change, match) -> None:
    raw = _repack(_manifest(), **change)
    with pytest.raises(mf.ManifestError, match=match):
        mf.decode(raw, mf.sha256_hex(raw))


def test_bytes_must_hash_to_the_id_and_be_canonical() -> None:
    m = _manifest()
    with pytest.raises(mf.ManifestError, match="hash"):
        mf.decode(m.raw[:-1] + bytes([m.raw[-1] ^ 1]), m.id)
    payload = msgpack.unpackb(m.raw, raw=False)
    unsorted = msgpack.packb(dict(reversed(sorted(payload.items()))), use_bin_type=True)
    with pytest.raises(mf.ManifestError, match="canonical"):
        mf.decode(unsorted, mf.sha256_hex(unsorted))
