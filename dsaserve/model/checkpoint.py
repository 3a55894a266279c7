"""A checkpoint's files and tensor headers, and the embedded default model's folder: what the server's front
process checks before it starts its ranks, kept free of torch (headers are read through safetensors'
numpy binding; no tensor data is read, but for weights_fingerprint's few bytes)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open


def default_model_path() -> Path:
    """The embedded default model (what runs when no model is given): a tiny DeepSeek-V3.2 model trained
    on the standard library's docstrings by `dsaserve train-tiny`, shipped inside the package."""
    path = Path(__file__).parents[1] / "assets" / "tiny-dsa"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {path}: reinstall dsaserve, "
                                f"or rebuild it with `dsaserve train-tiny {path}`")
    return path


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config.json describes; the message names the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]
    data: tuple[int, int]  # its bytes' [start, end) in the file


class Checkpoint:
    """Every tensor's shard, dtype and shape, from the shard headers (no tensor data is read)."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        self.files = shard_files(self.path)
        index = _weight_map(self.path) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in _headers(file).items():
                held = self.tensors.get(name)
                if held is not None and name not in index:  # (with an index, the shard it names holds the tensor)
                    raise CheckpointError(f"tensor {name} is in both {held.file.name} and {file.name}: which one "
                                          f"is the model's? (remove the stale shard)")
                if held is None or self.path / index[name] == file:
                    self.tensors[name] = info
        self._by_file: dict[Path, list[str]] = {file: [] for file in self.files}
        for name, info in self.tensors.items():
            self._by_file[info.file].append(name)

    def names_in(self, file: Path) -> list[str]:
        """The tensors this shard holds for the model (a tensor in two shards: the one the index names)."""
        return self._by_file[file]

    def is_fp8(self, name: str) -> bool:
        info = self.tensors.get(name)
        return info is not None and info.dtype == "F8_E4M3"


def _headers(file: Path) -> dict[str, TensorInfo]:
    """A shard's tensors from its header only (the numpy binding: no torch in the front process); a missing or
    unreadable shard (a partial download, a file still being written) is a CheckpointError naming it."""
    if not file.is_file():
        raise CheckpointError(f"{file} is listed in the shard index but does not exist")
    try:
        with safe_open(file, framework="numpy") as f:  # reads and checks the header against the file size
            names = list(f.keys())
        with open(file, "rb") as raw:  # the byte ranges, which safe_open does not expose: after the JSON header
            size = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(size))
        return {name: TensorInfo(file, header[name]["dtype"], tuple(header[name]["shape"]),
                                 tuple(8 + size + o for o in header[name]["data_offsets"])) for name in names}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated?): {exc}") from None


FINGERPRINT_TENSORS = 64  # tensors sampled, spread over the sorted names
FINGERPRINT_BYTES = 256  # of each, from its start


def weights_fingerprint(model_path: str | Path, load_format: str = "auto",
                        overrides: dict[str, Any] | None = None) -> str:
    """A short id of the model a server loads, so that PD servers which loaded different ones refuse to pair:
    a hash of config.json's settings and of FINGERPRINT_TENSORS tensors' names, dtypes, shapes and first bytes.
    The same for a copy elsewhere or another sharding; a full fine-tune differs in every tensor (one that changed
    a few tensors may escape the sample). load_format "dummy": the config alone (each rank seeds its shard
    alike, so servers of other TP layouts hold other random weights under the same id: benchmarks only)."""
    path = Path(model_path)
    config = {k: v for k, v in {**json.loads((path / "config.json").read_text()), **(overrides or {})}.items()
              if not k.startswith("_") and k != "transformers_version"}  # (as served: --json-model-override-args)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if load_format == "dummy":
        return "dummy-" + digest.hexdigest()[:16]
    tensors = Checkpoint(path).tensors
    names = sorted(tensors)
    for name in names[:: -(-len(names) // FINGERPRINT_TENSORS)]:
        info = tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.data[0])
            head = f.read(min(FINGERPRINT_BYTES, info.data[1] - info.data[0]))
        digest.update(f"{name}:{info.dtype}:{info.shape}:".encode() + head)
    return digest.hexdigest()[:16]


def _weight_map(model_path: Path) -> dict[str, str] | None:
    """model.safetensors.index.json's weight_map (tensor name -> shard file name), None without an index."""
    index = model_path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid shard index: its weight_map must map tensor names to "
                              f"shard file names")
    return weight_map


def shard_files(model_path: Path) -> list[Path]:
    weight_map = _weight_map(model_path)
    if weight_map is not None:
        return [model_path / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_path}")
    return files
