"""`--providers`: the client asks ONNX Runtime for execution providers by name, and says clearly when a build
lacks one (PyPI's onnxruntime has no CUDA; a Jetson needs NVIDIA's build)."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from edgesplit.client.head import Head, resolve_providers
from edgesplit.errors import EdgesplitError


def test_short_and_full_names_resolve_and_cpu_comes_last() -> None:
    assert resolve_providers([]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider", "cpu"]) == ["CPUExecutionProvider"]


def test_a_provider_this_build_lacks_is_an_error_naming_what_it_has() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(EdgesplitError, match=r"'cuda' \(CUDAExecutionProvider\) is not in this onnxruntime") as error:
        resolve_providers(["cuda", "cpu"])
    assert "CPUExecutionProvider" in str(error.value) and "onnxruntime-gpu" in str(error.value)
    with pytest.raises(EdgesplitError, match="NoSuchExecutionProvider"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_the_head_runs_on_the_providers_asked_for(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    head = Head(tiny_artifacts("llama", 1), providers=("cpu",))
    assert head.providers == ["CPUExecutionProvider"]
    assert head.forward_session.get_providers() == head.backward_session.get_providers() == ["CPUExecutionProvider"]


def test_the_client_refuses_a_missing_provider_before_connecting(tiny_artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w2", "completion": "w3"}) + "\n")
    command = [sys.executable, "-m", "edgesplit.cli", "client", "--server", "ws://127.0.0.1:9", "--artifacts",
               str(tiny_artifacts("llama", 1)), "--data", str(data), "--client-id", "c", "--providers", "cuda,cpu",
               "--connect-timeout", "1"]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert process.returncode != 0
    assert "'cuda' (CUDAExecutionProvider) is not in this onnxruntime" in process.stderr
    assert "cannot reach the server" not in process.stderr  # it stopped before trying
