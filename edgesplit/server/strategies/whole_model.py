"""What FedLLM and KD-FedLLM share: the device trains the whole model (ONNX, `export --full-model`), so the
server loads the same whole-model head to evaluate with, takes no Activations and keeps no tail state."""

from __future__ import annotations

from pathlib import Path

from edgesplit.client.data import EncodedSet
from edgesplit.client.head import Head
from edgesplit.client.local import eval_loss
from edgesplit.errors import ArtifactError, ProtocolError
from edgesplit.server.round_events import CLOSE_POLICY
from edgesplit.server.strategies.base import Arrays, TailState, encode_eval_file


def load_whole_model_head(artifacts: Path, framework: str) -> Head:
    head = Head(artifacts, verify=False)
    if not head.manifest.full_model:
        raise ArtifactError(f"{artifacts} is a split export; --framework {framework} needs --full-model artifacts")
    return head


def load_eval_set(head: Head, eval_data: Path | None) -> EncodedSet | None:
    return encode_eval_file(head, eval_data) if eval_data else None


def refuse_activations(framework: str) -> ProtocolError:
    return ProtocolError(
        f"this server runs {framework}: clients train on the device and send no activations", CLOSE_POLICY
    )


def evaluate_whole_model(head: Head, adapters: Arrays, eval_set: EncodedSet | None, eval_batches: int) -> float | None:
    if eval_set is None:
        return None
    return eval_loss(head, adapters, eval_set, eval_batches)


def no_tail_state() -> TailState:
    """The server trains nothing of its own here: a checkpoint's tail part stays empty."""
    return {"lora": {}, "optimizer": {"state": {}, "param_groups": []}}
