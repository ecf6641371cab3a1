"""A head whose frozen weights the client holds once and feeds to both graphs (export --dynamic-seq). numpy only.

A head's forward graph multiplies by each frozen weight W and its gradient graph by W transposed. Held as
graph constants, ONNX Runtime keeps a copy per graph (and an int8 head dequantised at load, two float32 copies):
for SmolLM2 at cut 4, 57 MB in the forward and 54 MB in the backward. A dynamic-length export instead takes
them as graph inputs, both graphs reading the same array (the backward as a Gemm with transB), and writes them
once into head_weights.safetensors:

    frozen.<n>                    a float32 weight (K, N), or for an int8 export
    frozen.<n>.q8, .scales        int8 codes (K, N) and their scales, one per block of 32 along K: the graphs
                                  dequantise each weight just before its product (DequantizeLinear), so a
                                  step holds one float32 weight at a time and the process holds the int8 bytes
    embed_tokens                  the token embedding table (V, H) float32, or
    embed_tokens.int8, .scale     int8 rows (V, H) with a scale each (V,)

The embedding table is not a graph input: the forward takes the batch's rows (`input_embeds`, (B, T, H)),
which `FedWeights.embed` reads from the file with one positioned read per distinct token. A table in a graph
is memory-mapped, and every row read maps the pages around it too (the kernel's fault-around): after a few
hundred distinct tokens most of the table was resident (27 of SmolLM2's 28 MB int8 table after 12 E2E steps).
Read this way, only the batch's rows are held, and the table's pages stay in the page cache, which the
system reclaims when it needs the memory.

The file is a safetensors file: an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data (https://github.com/huggingface/safetensors). The header is read here
directly, for the table's byte offset.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from edgesplit.errors import ArtifactError, TrainingError

WEIGHTS_FILE = "head_weights.safetensors"
EMBEDDINGS_INPUT = "input_embeds"  # the forward graph's input in place of the embedding lookup: (B, T, H)
FROZEN_PREFIX = "frozen."  # the graph inputs fed from the weights file
TABLE, TABLE_INT8, TABLE_SCALE = "embed_tokens", "embed_tokens.int8", "embed_tokens.scale"
MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I64": np.int64}


def read_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """The safetensors header of `path` (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ArtifactError(f"{path} is not a safetensors file (it is {len(prefix)} bytes long): export again")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ArtifactError(
                    f"{path}: a safetensors header of {length} bytes; the file is damaged: export again"
                )
            header = json.loads(file.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"cannot read the head's weights in {path}: {error}; export again") from error
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: the safetensors header is not a JSON object: export again")
    header.pop("__metadata__", None)
    return header, 8 + length


class FedWeights:
    """The frozen weights a head's graphs take as inputs, and the token embedding table they were cut from."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        from safetensors import safe_open

        self.path = path
        self._fd = -1
        header, data_start = read_header(path)
        self.arrays: dict[str, np.ndarray] = {}
        with safe_open(str(path), framework="numpy") as file:
            for name in header:
                if name.startswith(FROZEN_PREFIX) or name == TABLE_SCALE:
                    self.arrays[name] = np.ascontiguousarray(file.get_tensor(name))
        self.quantized = TABLE_INT8 in header
        table = TABLE_INT8 if self.quantized else TABLE
        entry = header.get(table)
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path} holds no embedding table ({TABLE} or {TABLE_INT8}): export again")
        dtype = np.dtype(_DTYPES.get(str(entry.get("dtype")), np.void))
        shape = entry.get("shape")
        expected = np.int8 if self.quantized else np.float32
        if dtype != expected or not isinstance(shape, list) or len(shape) != 2 or shape[0] != vocab_size:
            raise ArtifactError(
                f"{path}: the embedding table is {entry.get('dtype')} {shape}, expected "
                f"{np.dtype(expected).name} [{vocab_size}, width] (the manifest's vocabulary): export again"
            )
        hidden_size = int(shape[1])  # the embedding width: the hidden size, or OPT's word_embed_proj_dim
        if self.quantized and self.arrays.get(TABLE_SCALE, np.empty(0)).shape != (vocab_size,):
            raise ArtifactError(f"{path}: {TABLE_SCALE} must hold one scale per token ({vocab_size}): export again")
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise ArtifactError(f"{path}: {table} has no data_offsets: export again")
        self.vocab_size, self.hidden_size, self._dtype = vocab_size, hidden_size, dtype
        self._row_bytes = hidden_size * dtype.itemsize
        self._table_start = data_start + int(offsets[0])
        if int(offsets[1]) - int(offsets[0]) != vocab_size * self._row_bytes:
            raise ArtifactError(f"{path}: {table}'s byte range does not hold {vocab_size} rows: export again")
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """The embedding rows of `input_ids` (B, T) as float32 (B, T, H), each distinct token read once."""
        ids = np.asarray(input_ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise TrainingError(
                f"token ids must lie in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}"
            )
        tokens, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(tokens), self.hidden_size), dtype=self._dtype)
        for index, token in enumerate(tokens.tolist()):
            data = os.pread(self._fd, self._row_bytes, self._table_start + token * self._row_bytes)
            if len(data) != self._row_bytes:
                raise ArtifactError(f"{self.path} ended inside the embedding table: export again")
            rows[index] = np.frombuffer(data, dtype=self._dtype)
        values = rows.astype(np.float32)
        if self.quantized:
            values *= self.arrays[TABLE_SCALE][tokens][:, None]
        return values[inverse.reshape(ids.shape)]

    def inputs_for(self, names: list[str]) -> dict[str, np.ndarray]:
        """The held arrays among a graph's input `names` (the same arrays for both graphs: one copy)."""
        missing = [name for name in names if name.startswith(FROZEN_PREFIX) and name not in self.arrays]
        if missing:
            raise ArtifactError(f"{self.path} lacks {missing[:3]}, which the head's graphs take: export again")
        return {name: self.arrays[name] for name in names if name in self.arrays}

    @property
    def held_bytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())
