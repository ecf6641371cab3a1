"""What the server does with a round's updates, for the frameworks where the client holds the whole model.

The split framework's server logic (the tail, FedAvg of head adapters) lives in server.py. FedLLM and
KD-FedLLM run on the same server and transport; they differ only in what a client uploads and what the server
makes of it, which is what a strategy here decides:

    FedLLM     upload: the client's LoRA matrices on every layer   -> FedAvg -> download: global adapters
    KD-FedLLM  upload: top-k next-token probabilities on a shared    -> sample-weighted average of the
               proxy set (values and indices), no weights               distributions -> the server distils it
                                                                        into its own global model -> download:
                                                                        the averaged top-k, for the clients to
                                                                        distil from (their weights never travel)

KD-FedLLM follows FedMD (Li and Wang, 2019: clients share class scores on a public set, and each client
"digests" the consensus by distillation) with the server-side ensemble distillation of FedDF (Lin et al.,
2020: the server distils the clients' averaged outputs into a global model, here for evaluation). Both run on
the ONNX whole-model head (`export --full-model`), the server's distillation too, so neither needs PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesplit.client.data import EncodedSet, encode_examples, read_jsonl
from edgesplit.client.head import Head
from edgesplit.client.local import LocalTrainer, distil_on_proxy, eval_loss
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.server.aggregate import average_top_k, fedavg

Arrays = dict[str, np.ndarray]
FRAMEWORKS = ("split", "fedllm", "kd")


@dataclass(frozen=True)
class KdSettings:
    top_k: int = 16
    temperature: float = 1.0
    server_distill_epochs: int = 1
    client_distill_epochs: int = 1

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError("KD needs top_k >= 1 and a positive temperature")


def encode_file(head: Head, path: Path) -> EncodedSet:
    from tokenizers import Tokenizer

    manifest = head.manifest
    tokenizer = Tokenizer.from_file(str(head.root / "tokenizer.json"))
    return encode_examples(
        tokenizer, read_jsonl(path), manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )


class FedLlmStrategy:
    """FedAvg of whole-model adapters; evaluation with the ONNX whole-model head."""

    name = "fedllm"

    def __init__(self, artifacts: Path, eval_data: Path | None, eval_batches: int) -> None:
        self.head = Head(artifacts, verify=False)
        if not self.head.manifest.full_model:
            raise ArtifactError(f"{artifacts} is a split export; --framework {self.name} needs --full-model artifacts")
        self.global_adapters = self.head.initial_adapters()
        self.eval_set = encode_file(self.head, eval_data) if eval_data else None
        self.eval_batches = eval_batches

    def settings(self) -> dict[str, object]:
        return {"framework": self.name}

    def welcome_tensors(self) -> Arrays:
        return self.global_adapters

    def check_update(self, tensors: Arrays) -> None:
        self.head.check_adapters(tensors)

    def aggregate(self, updates: list[tuple[Arrays, int]]) -> Arrays:
        self.global_adapters = fedavg(updates)
        return self.global_adapters

    def evaluate(self) -> float | None:
        if self.eval_set is None:
            return None
        return eval_loss(self.head, self.global_adapters, self.eval_set, self.eval_batches)


class KdStrategy(FedLlmStrategy):
    """Averages the clients' top-k logits on the proxy set and distils them into the server's global model."""

    name = "kd"

    def __init__(
        self,
        artifacts: Path,
        eval_data: Path | None,
        eval_batches: int,
        proxy_data: Path | None,
        learning_rate: float,
        settings: KdSettings | None = None,
    ) -> None:
        super().__init__(artifacts, eval_data, eval_batches)
        if proxy_data is None:
            raise TrainingError("--framework kd needs --proxy-data: the shared inputs the clients' logits are on")
        self.kd = settings or KdSettings()
        self.proxy = encode_file(self.head, proxy_data)
        self.trainer = LocalTrainer(self.head, self.global_adapters, learning_rate)
        self.targets: tuple[np.ndarray, np.ndarray] | None = None

    def settings(self) -> dict[str, object]:
        return {
            "framework": self.name,
            "top_k": self.kd.top_k,
            "temperature": self.kd.temperature,
            "client_distill_epochs": self.kd.client_distill_epochs,
        }

    def welcome_tensors(self) -> Arrays:
        # The proxy set travels once, as tokens; no weights ever do.
        return {"proxy.input_ids": self.proxy.input_ids, "proxy.attention_mask": self.proxy.attention_mask}

    def check_update(self, tensors: Arrays) -> None:
        values, indices = tensors.get("proxy_values"), tensors.get("proxy_indices")
        expected = (*self.proxy.input_ids.shape, self.kd.top_k)
        if values is None or indices is None or values.shape != expected or indices.shape != expected:
            raise TrainingError(f"a KD update carries proxy_values and proxy_indices of shape {expected}")
        if np.any(indices < 0) or np.any(indices >= self.head.manifest.vocab_size):
            raise TrainingError("proxy_indices outside the vocabulary")
        if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
            raise TrainingError("proxy_values must be probabilities in [0, 1]")

    def aggregate(self, updates: list[tuple[Arrays, int]]) -> Arrays:
        values, indices = average_top_k([(t["proxy_values"], t["proxy_indices"], n) for t, n in updates], self.kd.top_k)
        distil_on_proxy(self.trainer, self.proxy, values, indices, self.kd.temperature, self.kd.server_distill_epochs)
        return {"proxy_values": values, "proxy_indices": indices}
