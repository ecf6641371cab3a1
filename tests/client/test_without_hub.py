"""The client's tokenisation path without huggingface_hub, which the slim device install leaves out.

tokenizers declares a dependency on huggingface-hub (for `Tokenizer.from_pretrained`), and
tools/install_edge.py drops it with the dozen packages only it needs. This runs the client's own code in a
fresh process where importing huggingface_hub (or torch) fails, as it does in the slim venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

REPO = Path(__file__).resolve().parents[2]


def blocking(*names: str) -> str:
    """Script lines that put a meta-path finder first in line: importing `names` fails before they are found."""
    return f"""
import importlib.abc, json, sys
BLOCKED = {names!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
"""


SCRIPT = (
    blocking("huggingface_hub", "hf_xet", "torch", "transformers")
    + r"""
try:
    import huggingface_hub
except ImportError:
    pass
else:
    raise SystemExit("the blocker did not block huggingface_hub")

import edgesplit.client.client  # the whole client module, as `edgesplit client` loads it
from edgesplit.client.data import encode_examples, read_jsonl
from tokenizers import Tokenizer

artifacts, data = sys.argv[1], sys.argv[2]
tokenizer = Tokenizer.from_file(f"{artifacts}/tokenizer.json")  # what Client.__init__ does
encoded = encode_examples(tokenizer, read_jsonl(data), 8, 2, 1)
print(json.dumps({"input_ids": encoded.input_ids.tolist(), "labels": encoded.labels.tolist(),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED + ("tokenizers",))}))
"""
)


def test_the_client_tokenises_with_huggingface_hub_unimportable(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<pad>": 1, "</s>": 2, "what": 3, "is": 4, "two": 5, "plus": 6, "three": 7, "five": 8}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_padding(pad_id=1, pad_token="<pad>")  # as transformers saves some: the client copies it
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "what is two plus three", "completion": "five"}) + "\n")

    process = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["input_ids"] == [[3, 4, 5, 6, 7, 8, 2, 1]]
    assert result["labels"] == [[-100, -100, -100, -100, -100, 8, 2, -100]]
    assert all(name.split(".")[0] == "tokenizers" for name in result["loaded"])


# onnxruntime up to 1.23 (the newest for Python 3.10) requires sympy and coloredlogs for its tools; the slim
# install drops them too. The client's int8 head, the one with contrib ops, must train without them.
HEAD_SCRIPT = (
    blocking("sympy", "mpmath", "coloredlogs", "humanfriendly", "huggingface_hub", "torch")
    + r"""
import numpy as np
import onnxruntime
from edgesplit.client.head import Head
head = Head(sys.argv[1])
ids = np.full((head.manifest.batch_size, head.manifest.max_seq_len), 5, dtype=np.int64)
forward = head.forward(ids, np.ones_like(ids), head.initial_adapters())
grads = head.backward(forward, np.ones(head.manifest.activations_shape, dtype=np.float32))
print(json.dumps({"finite": bool(all(np.isfinite(g).all() for g in grads.values())), "grads": len(grads),
                  "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))}))
"""
)


def test_the_int8_head_trains_without_onnxruntimes_tool_dependencies(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 2, quantize="int8")
    process = subprocess.run(
        [sys.executable, "-c", HEAD_SCRIPT, str(artifacts)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert process.returncode == 0, process.stdout + process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result == {"finite": True, "grads": 8, "loaded": []}
