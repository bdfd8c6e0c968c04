"""Checkpoint reader: Hugging Face folders of config.json + safetensors, read by header only.

Contract: `Checkpoint.open(folder)` validates the folder and every safetensors header and returns where every
tensor lives (file, absolute byte offset, dtype, shape) without reading tensor data. It refuses, with a
`CheckpointError` (a ValueError) naming the file or field and what is allowed:
  - a missing folder, config.json, or weights;
  - a shard path that leaves the folder (`../`, absolute, or a symlink pointing outside);
  - pickle weights (.bin/.pt/.pth) unless `allow_pickle=True` (then they are converted once to safetensors in a
    cache folder with `torch.load(weights_only=True)` and read from there);
  - a truncated or corrupt safetensors header;
  - 16-bit float tensors of both kinds (F16 and BF16), or of the kind config.json does not declare (`dtype` /
    `torch_dtype`): such a header was relabelled, and its bytes would be read in the wrong number format. (The
    routed experts' dtype must equal the declared one exactly: `ExpertLayout.build`.)
Architecture support is checked by `moelite.core.arch.adapter_for`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
#: torch dtype -> its safetensors name (error messages say what the header says)
HEADER_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: config.json's dtype names (transformers writes `dtype`, before 5.0 `torch_dtype`)
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                 "float32": torch.float32, "float": torch.float32, "float64": torch.float64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint folder that moelite refuses; the message names the file/field and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path  # resolved path of the shard
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def slice_rows(self, start: int, count: int) -> "TensorInfo":
        """The contiguous block of `count` leading-dimension rows starting at `start` (fused 3D expert tensors)."""
        row = self.nbytes // self.shape[0]
        return TensorInfo(f"{self.name}[{start}:{start + count}]", self.file, self.offset + start * row,
                          row * count, self.dtype, (count, *self.shape[1:]))


def _display(folder: Path, file: Path) -> str:
    try:
        return str(file.relative_to(folder))
    except ValueError:
        return file.name


def read_safetensors_header(file: Path, display: str | None = None) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; returns tensor name -> TensorInfo."""
    display = display or file.name
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{display}: truncated safetensors file ({size} bytes, no header length); "
                                      "re-download or re-save the checkpoint")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or hlen > size - 8:
                raise CheckpointError(f"{display}: corrupt or truncated safetensors header (header length {hlen} "
                                      f"but file has {size} bytes); re-download or re-save the checkpoint")
            raw = fh.read(hlen)
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{display}: corrupt safetensors header (not valid JSON: {exc}); "
                              "re-download or re-save the checkpoint") from exc
    data_start = 8 + hlen
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape, offsets = list(meta["shape"]), list(meta["data_offsets"])
            if len(offsets) != 2 or not all(type(v) is int for v in shape + offsets):  # 2.0 or True is no size
                raise ValueError("shape and data_offsets must be integers")
            shape = tuple(shape)
            begin, end = offsets
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{display}: corrupt safetensors header entry for tensor {name!r} "
                                  f"(needs dtype in {sorted(SAFETENSORS_DTYPES)}, an integer shape and two integer "
                                  "data_offsets)") from exc
        numel = 1
        for s in shape:
            if s < 0:
                raise CheckpointError(f"{display}: tensor {name!r} has a negative dimension {shape}")
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != expected:
            raise CheckpointError(f"{display}: corrupt safetensors header: tensor {name!r} spans {end - begin} "
                                  f"bytes but {meta['dtype']}{list(shape)} needs {expected}")
        if end > data_len:
            raise CheckpointError(f"{display}: truncated safetensors file: tensor {name!r} ends at byte "
                                  f"{data_start + end} but the file has {size}; re-download the checkpoint")
        out[name] = TensorInfo(name, file, data_start + begin, end - begin, dtype, shape)
    spans = sorted((t.offset, t.offset + t.nbytes, n) for n, t in out.items() if t.nbytes)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:  # two tensors sharing bytes: a corrupt or crafted header
            raise CheckpointError(f"{display}: corrupt safetensors header: tensors {prev!r} and {name!r} overlap "
                                  "in the file; re-download or re-save the checkpoint")
    return out


def _confined(folder: Path, rel: str, what: str) -> Path:
    """Resolve `rel` inside `folder`, refusing absolute paths, `..` and symlinks that leave the folder."""
    if os.path.isabs(rel) or Path(rel).drive:
        raise CheckpointError(f"{what}: shard path {rel!r} is absolute; shard paths must be relative to the model folder")
    if ".." in Path(rel).parts:
        raise CheckpointError(f"{what}: shard path {rel!r} leaves the model folder ('..' is not allowed)")
    root = folder.resolve()
    target = (folder / rel).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{what}: shard {rel!r} is a symlink pointing outside the model folder; "
                              "copy the file into the folder instead")
    return target


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @classmethod
    def open(cls, folder: str | os.PathLike, allow_pickle: bool = False) -> "Checkpoint":
        folder = Path(folder).expanduser()
        if not folder.exists():
            raise CheckpointError(f"model folder {str(folder)!r} does not exist; pass a Hugging Face checkpoint "
                                  "folder (config.json + *.safetensors)")
        if not folder.is_dir():
            raise CheckpointError(f"{str(folder)!r} is a file, not a model folder; pass the folder holding config.json")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"config.json is missing in model folder {folder.name!r}; a Hugging Face "
                                  "checkpoint folder needs config.json and *.safetensors")
        _confined(folder, "config.json", "config.json")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"config.json in {folder.name!r} is not valid JSON ({exc})") from exc
        if "model_type" not in config:
            raise CheckpointError("config.json: field 'model_type' is missing; it names the architecture "
                                  "(e.g. 'qwen2_moe', 'mixtral')")

        files = cls._weight_files(folder, allow_pickle)
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_safetensors_header(f, _display(folder, f)).items():
                tensors[name] = info
        ckpt = cls(folder, config, tensors, files)
        ckpt._check_index()
        ckpt._check_dtypes()
        return ckpt

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """The dtype config.json declares (`dtype`, or `torch_dtype` before transformers 5); None when it names
        none (or no float type)."""
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return CONFIG_DTYPES.get(value) if isinstance(value, str) else None

    def _check_dtypes(self) -> None:
        """16-bit float tensors are all of one kind, the declared one when config.json declares a 16-bit dtype (see
        the module contract)."""
        half = (torch.bfloat16, torch.float16)
        first: dict[torch.dtype, str] = {}
        for name, t in self.tensors.items():
            if t.dtype in half:
                first.setdefault(t.dtype, name)
        declared = self.declared_dtype
        if declared in half:
            bad = next((d for d in first if d != declared), None)
            other = f"config.json declares dtype {str(declared).removeprefix('torch.')!r}"
        else:
            bad = torch.float16 if len(first) == 2 else None
            other = f"tensor {first.get(torch.bfloat16)!r} is BF16"
        if bad is not None:
            name = first[bad]
            raise CheckpointError(
                f"{self.display(self.tensors[name].file)}: tensor {name!r} is {HEADER_NAMES[bad]} in the safetensors "
                f"header, but {other}; a checkpoint stores its 16-bit weights in one format, so this header was "
                "relabelled and the bytes would be read as the wrong number format: re-download or re-save the "
                "checkpoint (if the weights really are in that format, convert them all to one and set \"dtype\" "
                "in config.json to it)")

    @staticmethod
    def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError("model.safetensors.index.json: field 'weight_map' (tensor name -> shard "
                                      "file) is missing or invalid") from exc
            shards = sorted(set(weight_map.values()))
            files = []
            for rel in shards:
                if not isinstance(rel, str) or not rel.endswith(".safetensors"):
                    raise CheckpointError(f"model.safetensors.index.json: shard {rel!r} is not a .safetensors file")
                path = _confined(folder, rel, "model.safetensors.index.json")
                if not path.is_file():
                    raise CheckpointError(f"model.safetensors.index.json names shard {rel!r}, which is missing "
                                          "from the model folder")
                files.append(path)
            return files
        found = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
        if found:
            return [_confined(folder, p.name, p.name) for p in found]
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickles[0].name}: pickle weights are refused (loading pickle can run arbitrary code). "
                    "Convert the checkpoint to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
                    "if you trust its source")
            return [_convert_pickle(folder, [_confined(folder, p.name, p.name) for p in pickles])]
        raise CheckpointError(f"no weights in model folder {folder.name!r}: expected model.safetensors, "
                              "model.safetensors.index.json with shards, or *.safetensors files")

    def _check_index(self) -> None:
        index = self.folder / "model.safetensors.index.json"
        if not index.is_file():
            return
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, rel in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file != (self.folder / rel).resolve():
                raise CheckpointError(f"model.safetensors.index.json: tensor {name!r} is mapped to {rel!r} "
                                      "but that shard does not contain it")

    def display(self, file: Path) -> str:
        return _display(self.folder.resolve(), file)


def _convert_pickle(folder: Path, pickles: list[Path]) -> Path:
    """Convert trusted pickle weights to one safetensors file in the user cache; returns its path."""
    key = hashlib.sha256("|".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in pickles).encode())
    cache = Path(os.environ.get("MOELITE_CACHE", Path.home() / ".cache" / "moelite")) / "converted"
    out = cache / f"{key.hexdigest()[:16]}.safetensors"
    if out.is_file():
        return out
    state: dict[str, torch.Tensor] = {}
    for p in pickles:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{p.name}: expected a state dict of tensors, got {type(obj).__name__}")
        state.update({k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)})
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.rename(out)
    return out
