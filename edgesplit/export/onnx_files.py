"""Write an ONNX graph with its weights in a page-aligned external data file beside it.

    head.onnx        the graph, small
    head.onnx.data   every initializer of at least EXTERNAL_MIN_BYTES; those of at least ALIGN_MIN_BYTES start
                     on a 4 KiB boundary

ONNX Runtime maps an external data file into memory instead of copying it when each tensor's offset is a
multiple of the page size (onnx.save's own external data packs tensors back to back, so the runtime copies).
A mapped tensor costs resident memory only for the pages that are read: for the head's embedding table, the
rows of the batch's tokens and the pages around them, not the whole table (113 MB in float32 for SmolLM2).
Weights that the runtime repacks at load (MatMul, MatMulNBits) are copied either way.
"""

from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_MIN_BYTES = 1024
ALIGN_MIN_BYTES = 64 * 1024  # smaller tensors are copied at load anyway: not worth a padded page each
ALIGNMENT = 4096  # the page size on Linux x86-64 and arm64 (Raspberry Pi OS and JetPack use 4 KiB pages)


def data_file_name(model_file: str) -> str:
    return f"{model_file}.data"


def save_with_aligned_data(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` to `path`, its large initializers into `<path>.data` at page-aligned offsets.

    Changes `model` in place (its initializers then point into the data file).
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
            padding = -offset % ALIGNMENT if len(raw) >= ALIGN_MIN_BYTES else 0
            data.write(b"\0" * padding)
            offset += padding
            data.write(raw)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    onnx.save(model, str(path))
