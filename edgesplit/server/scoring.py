"""A run's model scored as a person will use it: the whole base model with the run's PEFT adapter.

    checkpoint ─ edgesplit.server.adapter ─> adapter DIR ─┐
    artifacts' model_source ─ load_model ─> base model  ──┴─> PeftModel ─ hf_generate.generate_ids ─> token ids
                                                               (batched, left-padded, KV cache)

The demo and `edgesplit compare` score with this. It computes what the split model computes (the adapter is
the union of the head's and the tail's LoRA, tested equal in tests/server/test_adapter.py), but each new
token costs one position against cached keys and values, where the split model's own generation
(edgesplit/server/generate.py) reruns its whole traced window for every token.

Two things keep the generations those of the split model, token for token (tests/server/test_scoring.py):
prompts are the artifacts' own tokenizer's ids, and a row stops where the split model's window of
`max_seq_len` tokens would stop it (the prompt cut to its last max_seq_len - 1 tokens, then room for
max_seq_len - len(prompt) + 1 new ones). An export with `--quantize int8` is the exception: its head
computes over int8 weights, the adapter here applies to the float base, which is what a user of the adapter
gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.data import load_tokenizer
from edgesplit.errors import ArtifactError, ExportError
from edgesplit.server.hf_generate import generate_ids

DEFAULT_BATCH_SIZE = 16  # rows per generate call, as bench/generate.py runs it (other sizes not measured)


class AdapterGenerator:
    """Greedy decoding with the base model of an artifact directory, with one of its loaded adapters or none.

    Its `generate(prompts, adapter, max_new_tokens)` answers as edgesplit.server.generate.SplitGenerator's
    does, with an adapter name (from `add_adapter`) in place of the client adapters; None runs the base
    model, which is the untrained split model: both halves start with LoRA B at zero.
    """

    def __init__(
        self, artifacts: Path, batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 0, window: int | None = None
    ) -> None:
        import torch

        from edgesplit.export.models import load_model

        if threads:
            torch.set_num_threads(threads)
        manifest = load_manifest(artifacts, verify=False)
        try:
            self.model: Any = load_model(manifest.model_source).model
        except ExportError as error:
            raise ArtifactError(f"cannot load the base model the artifacts were exported from: {error}") from error
        self.tokenizer = load_tokenizer(artifacts)  # the ids training used, which a hub tokenizer may not give
        self.eos_token_id = manifest.eos_token_id
        pad = manifest.pad_token_id if manifest.pad_token_id is not None else manifest.eos_token_id
        self.pad_token_id = 0 if pad is None else pad
        self.window = manifest.max_seq_len if window is None else window
        self.batch_size = batch_size
        self.adapters: dict[str, Path] = {}

    def add_adapter(self, name: str, directory: Path) -> None:
        """Load the PEFT adapter in `directory` under `name` (for `generate`)."""
        from peft import PeftModel

        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name)
        else:
            self.model.load_adapter(str(directory), adapter_name=name)
        self.model.eval()
        self.adapters[name] = directory

    def generate(self, prompts: Sequence[Sequence[int]], adapter: str | None, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id `prompts` with the adapter `adapter` (None: the base model)."""
        from contextlib import nullcontext

        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r} is loaded (have {sorted(self.adapters)})")
        kept = [list(prompt)[-(self.window - 1) :] if self.window > 1 else list(prompt)[-1:] for prompt in prompts]
        budgets = [max(1, min(max_new_tokens, self.window - len(prompt) + 1)) for prompt in kept]
        if adapter is None:
            context: Any = self.model.disable_adapter() if self.adapters else nullcontext()
        else:
            self.model.set_adapter(adapter)
            context = nullcontext()
        with context:
            return generate_ids(self.model, kept, budgets, self.pad_token_id, self.eos_token_id, self.batch_size)

    def eval_loss(self, encoded: Any, adapter: str | None, max_batches: int, batch_size: int) -> tuple[float, int]:
        """Mean token loss over the first `batch_size * max_batches` rows of `encoded` (an EncodedSet), and the
        target tokens it is the mean of: the server's per-round figure, computed on the whole model."""
        from contextlib import nullcontext

        import torch

        from edgesplit.server.tail import causal_lm_loss

        count = min(len(encoded.input_ids), batch_size * max_batches)
        total, tokens = 0.0, 0
        if adapter is None:
            context: Any = self.model.disable_adapter() if self.adapters else nullcontext()
        else:
            self.model.set_adapter(adapter)
            context = nullcontext()
        with context, torch.no_grad():
            for start in range(0, count, batch_size):
                end = min(start + batch_size, count)
                ids = torch.from_numpy(encoded.input_ids[start:end]).long()  # (B, T), padded on the right
                mask = torch.from_numpy(encoded.attention_mask[start:end]).long()
                labels = torch.from_numpy(encoded.labels[start:end]).long()
                counted = int((labels[:, 1:] != -100).sum())
                if not counted:
                    continue
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
                total += float(causal_lm_loss(logits, labels)) * counted
                tokens += counted
        return total / max(tokens, 1), tokens
