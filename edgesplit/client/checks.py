"""What the client checks before anything slow: its command line's server address and client id, and how much
of the training data the export's token window holds. numpy and the protocol's messages only."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from edgesplit.client.artifacts import Manifest
from edgesplit.client.data import EncodedSet
from edgesplit.client.protocol import PROTOCOL_VERSION, Hello
from edgesplit.errors import ArtifactError, DataError, EdgesplitError, ProtocolError

# One step's activations (batch x tokens x hidden, float32) past this are no edge device's batch: a manifest
# asking for more is refused before anything is allocated for it.
MAX_STEP_ACTIVATION_BYTES = 1 << 30
SERVER_FORM = "ws://HOST:PORT (wss://HOST:PORT for TLS), e.g. ws://192.168.1.20:8765"
_NOT_IN_CLIENT_ID = re.compile(r"[^A-Za-z0-9._-]+")


def check_server_url(server: str) -> None:
    """Refuse a --server that the websocket library would only choke on later, with a traceback.

    The scheme is required rather than guessed: ws:// and wss:// differ in whether the link is encrypted,
    and a client that silently picked one would hide that choice. The port is required too: a bare
    ws://HOST means port 80, which an edgesplit server never listens on by default (8765).
    """
    if "://" not in server:
        hint = f" (did you mean ws://{server}?)" if re.fullmatch(r"[^\s/]+:\d+", server) else ""
        raise EdgesplitError(f"--server {server!r} has no scheme: write it as {SERVER_FORM}{hint}")
    parts = urlsplit(server)
    scheme = server.partition("://")[0]  # as written: the client picks TLS by the lower-case prefix
    if scheme not in ("ws", "wss"):
        raise EdgesplitError(
            f"--server {server!r}: the scheme must be ws:// or wss://, not {scheme}://; write it as {SERVER_FORM}"
        )
    if any(character.isspace() for character in server):
        raise EdgesplitError(f"--server {server!r} contains white space: write it as {SERVER_FORM}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if port is not None and not 1 <= port <= 65535:
        port_text = parts.netloc.rpartition(":")[2]
        raise EdgesplitError(
            f"--server {server!r}: port {port_text!r} is not a number from 1 to 65535; write it as {SERVER_FORM}"
        )
    if not parts.hostname:
        raise EdgesplitError(f"--server {server!r} names no host: write it as {SERVER_FORM}")
    if port is None:
        raise EdgesplitError(
            f"--server {server!r} names no port: add the port `edgesplit serve` listens on "
            f"(its --port, 8765 by default), as in {parts.scheme}://{parts.hostname}:8765"
        )


def check_client_id(client_id: str) -> None:
    """Refuse a --client-id that the server would refuse, by the protocol's own rule (Hello), before
    anything slow: loading the head takes seconds, and a refusal after connecting costs the server a
    connection too."""
    try:
        Hello(client_id, PROTOCOL_VERSION, manifest_hash="", token=None, num_samples=0)
    except ProtocolError as error:
        suggestion = _NOT_IN_CLIENT_ID.sub("-", client_id).strip("-")[:64]
        instead = f", such as {suggestion!r}" if suggestion else ""
        raise EdgesplitError(
            f"--client-id: {error} (the id ends up in the server's file names and log lines, so no spaces); "
            f"use another{instead}"
        ) from None


def check_token_window(data: Path, encoded: EncodedSet, client_id: str) -> None:
    """Say, before connecting, how much of the data the export's token window cuts: a window too short for
    the data trains on nothing, which would otherwise show only as a loss that does not move."""
    window = encoded.max_seq_len
    if encoded.num_without_targets == len(encoded):
        raise DataError(
            f"{data}: none of its {len(encoded)} examples keeps a completion token within the export's "
            f"{window}-token window (max_seq_len in the manifest), so there is nothing to train on: shorten "
            "the prompts, or export again with a larger --max-seq-len"
        )
    if encoded.num_truncated:
        print(
            f"[{client_id}] warning: {data}: {encoded.num_truncated} of {len(encoded)} examples are longer "
            f"than the export's {window}-token window and are cut; {encoded.num_without_targets} of them keep "
            "no completion token and add nothing to the loss",
            file=sys.stderr,
            flush=True,
        )


def check_manifest_shapes(manifest: Manifest, where: Path) -> None:
    """Refuse a manifest whose shapes the head was not traced for, or whose batch no device could hold,
    before any batch is made: a batch_size of 10**12 would otherwise grow the client's memory until the
    system kills it."""
    batch, tokens = manifest.batch_size, manifest.max_seq_len
    if batch < 1 or tokens < 1:
        raise ArtifactError(f"{where}: batch_size {batch} and max_seq_len {tokens} must be at least 1; export again")
    traced = next((spec.shape for spec in manifest.head_inputs if spec.name == "input_ids"), None)
    if traced is not None and all(isinstance(size, int) for size in traced) and tuple(traced) != (batch, tokens):
        raise ArtifactError(
            f"{where}: batch_size {batch} x max_seq_len {tokens}, but the head's graph is traced for "
            f"{traced[0]} x {traced[1]}: the manifest was edited; copy it again from the export"
        )
    step_bytes = batch * tokens * manifest.hidden_size * 4
    if step_bytes > MAX_STEP_ACTIVATION_BYTES:
        raise ArtifactError(
            f"{where}: one step of batch_size {batch} x max_seq_len {tokens} would carry {step_bytes / 2**30:,.1f} "
            f"GiB of activations, past the {MAX_STEP_ACTIVATION_BYTES / 2**30:g} GiB an edge device can: "
            "export again with a smaller --batch-size or --max-seq-len"
        )
    if not math.isfinite(manifest.lora.alpha) or manifest.lora.rank < 1:
        raise ArtifactError(f"{where}: lora rank {manifest.lora.rank} and alpha {manifest.lora.alpha} are not usable")
