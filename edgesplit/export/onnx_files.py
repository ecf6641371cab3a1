"""Write an ONNX graph with its weights in a page-aligned external data file beside it.

    head.onnx        the graph, small
    head.onnx.data   every initializer of at least EXTERNAL_MIN_BYTES; those of at least ALIGN_MIN_BYTES start
                     on a 4 KiB boundary

ONNX Runtime maps an external data file into memory instead of copying it when each tensor's offset is a
multiple of the page size (onnx.save's own external data packs tensors back to back, so the runtime copies).
A mapped tensor costs resident memory only for the pages that are read: for the head's embedding table, the
rows of the batch's tokens and the pages around them, not the whole table (113 MB in float32 for SmolLM2).
Weights that the runtime repacks at load (MatMul, MatMulNBits) are copied either way.

Graphs of one head traced for several sequence lengths (export --seq-buckets) hold the same weights: a
shorter bucket's graph points into the full-length graph's data file for every tensor whose bytes are
already there (`SharedData`), and writes only the rest (masks and position tables of its own length) into
a data file of its own. A bucket then costs its graph and a few hundred KB, not another copy of the weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx

EXTERNAL_MIN_BYTES = 1024
ALIGN_MIN_BYTES = 64 * 1024  # smaller tensors are copied at load anyway: not worth a padded page each
ALIGNMENT = 4096  # the page size on Linux x86-64 and arm64 (Raspberry Pi OS and JetPack use 4 KiB pages)


def data_file_name(model_file: str) -> str:
    return f"{model_file}.data"


@dataclass
class SharedData:
    """Tensors already written to data files in one directory, by content: (data type, dims, sha256 of the
    bytes) -> (file name, offset, length)."""

    tensors: dict[tuple[int, tuple[int, ...], str], tuple[str, int, int]] = field(default_factory=dict)


def _content_key(tensor: onnx.TensorProto) -> tuple[int, tuple[int, ...], str]:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).hexdigest()


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def save_with_aligned_data(
    model: onnx.ModelProto, path: Path, shared: SharedData | None = None, record: bool = False
) -> None:
    """Save `model` to `path`, its large initializers into `<path>.data` at page-aligned offsets.

    With `shared` and `record`, every tensor written here is recorded in it for later graphs; with `shared`
    alone, a tensor whose bytes are recorded there points there instead of being written again. Changes
    `model` in place (its initializers then point into the data files).
    """
    location = data_file_name(path.name)
    offset = 0
    with open(path.with_name(location), "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {tensor.name} already points to external data; load it first")
            if not tensor.HasField("raw_data"):  # typed fields (float_data, ...): store as raw bytes first
                tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = _content_key(tensor) if shared is not None else None
            if shared is not None and not record and key in shared.tensors:
                _point_to(tensor, *shared.tensors[key])
                continue
            padding = -offset % ALIGNMENT if len(raw) >= ALIGN_MIN_BYTES else 0
            data.write(b"\0" * padding)
            offset += padding
            data.write(raw)
            if shared is not None and key is not None and record:
                shared.tensors[key] = (location, offset, len(raw))
            _point_to(tensor, location, offset, len(raw))
            offset += len(raw)
    onnx.save(model, str(path))


def external_files(path: Path) -> list[str]:
    """The data files an ONNX graph's initializers point into, in the order they first appear."""
    model = onnx.load(str(path), load_external_data=False)
    files: list[str] = []
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in files:
                files.append(entry.value)
    return files
