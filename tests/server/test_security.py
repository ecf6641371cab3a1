"""Security with a real server and real clients on loopback: wss:// with a certificate made here, per-client
tokens, strangers refused before any tensor is read, nothing unpickled, nothing written outside the server's
own directories."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import signal
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loopback import (
    REPO,
    Processes,
    activations,
    client_command,
    free_port,
    hello_frame,
    probe,
    serve_command,
    write_task,
)

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import encode
from edgesplit.server.checkpoint import Checkpoint, load_latest, save_checkpoint
from edgesplit.server.server import HELLO_MAX_BYTES


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for localhost and 127.0.0.1: ca.pem, server.pem, server.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgesplit test CA")])

    def builder(subject: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    ca = (
        builder(ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), server_key)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tls_run(tiny_artifacts, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A wss:// server that requires tokens; clients a and b train on it while strangers try their luck."""
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    outside = tmp_path_factory.mktemp("outside")  # the test's own files: data, certificates, client metrics
    work = tmp_path_factory.mktemp("server-work")  # the server's: --checkpoint-dir, --metrics-out
    ca, cert, key = make_certificates(outside)
    tokens = {"a": secrets.token_urlsafe(32), "b": secrets.token_urlsafe(32)}
    (outside / "tokens.txt").write_text("".join(f"{c} {t}\n" for c, t in tokens.items()))
    for client_id, token in tokens.items():
        (outside / f"{client_id}.token").write_text(token + "\n")
        write_task(outside / f"{client_id}.jsonl", seed=ord(client_id), count=16)
    (outside / "wrong.token").write_text("not-the-token\n")
    # The server runs with an empty working directory, home and temp dir: afterwards they must still be empty.
    server_cwd, home, temp = (outside / name for name in ("cwd", "home", "tmp"))
    for directory in (server_cwd, home, temp):
        directory.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(temp), PYTHONPATH=str(REPO))
    port = free_port()
    url = f"wss://localhost:{port}"
    server_tls = [
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--tokens-file",
        str(outside / "tokens.txt"),
    ]

    def client(client_id: str, *extra: str, server: str = url, data: str = "a") -> list[str]:
        return client_command(server, artifacts, outside / f"{data}.jsonl", client_id, outside, extra)

    trusted = ssl.create_default_context(cafile=str(ca))
    results: dict[str, Any] = {"work": work, "home": home, "temp": temp, "cwd": server_cwd, "outcomes": {}}
    with Processes() as run:
        server = run.start(
            "server",
            serve_command(artifacts, port, work, rounds=2, steps=3, extra=server_tls),
            cwd=server_cwd,
            env=env,
        )
        server.wait_for("listening on wss://")
        a = run.start("a", client("a", "--ca-file", str(ca), "--token-file", str(outside / "a.token")))
        server.wait_for(r"\ba joined")

        outcomes = results["outcomes"]
        for name, client_id, token in [
            ("wrong token", "a", "guess"),
            ("unknown client", "mallory", "guess"),
            ("no token", "a", None),
            ("another client's token", "a", tokens["b"]),
        ]:
            outcome = probe(url, hello_frame(client_id, manifest, token), ssl=trusted)
            outcomes[name] = (outcome.error, outcome.close_code)
        outcome = probe(url, encode(activations(manifest)), ssl=trusted)
        outcomes["tensors before Hello"] = (outcome.error, outcome.close_code)
        outcome = probe(url, b"\x00" * (HELLO_MAX_BYTES + 1), ssl=trusted)
        outcomes["big frame before Hello"] = (outcome.error, outcome.close_code)

        # Clients that must fail, each on its own and at once (the run waits for b at the start barrier).
        for name, command in [
            ("no CA", client("a", "--token-file", str(outside / "a.token"))),
            (
                "plain ws://",
                client(
                    "a",
                    "--token-file",
                    str(outside / "a.token"),
                    "--connect-timeout",
                    "3",
                    server=f"ws://localhost:{port}",
                ),
            ),
            (
                "wrong token file",
                client("b", "--ca-file", str(ca), "--token-file", str(outside / "wrong.token"), data="b"),
            ),
        ]:
            failing = run.start(name, command)
            results[name] = (failing.wait(120), failing.output)

        b = run.start("b", client("b", "--ca-file", str(ca), "--token-file", str(outside / "b.token"), data="b"))
        results.update(a=(a.wait(), a.output), b=(b.wait(), b.output))
        results["server"] = (server.wait(), server.output)
    return results


def test_clients_with_their_tokens_train_over_tls(tls_run) -> None:  # type: ignore[no-untyped-def]
    for name in ("a", "b", "server"):
        code, output = tls_run[name]
        assert code == 0, output
    assert "round 2/2 closed with 2 clients (a, b)" in tls_run["server"][1]


def test_bad_tokens_are_refused_before_anything_else_is_read(tls_run) -> None:  # type: ignore[no-untyped-def]
    assert tls_run["outcomes"] == {
        "wrong token": ("bad_token", 1008),
        "unknown client": ("bad_token", 1008),
        "no token": ("bad_token", 1008),
        "another client's token": ("bad_token", 1008),
        "tensors before Hello": ("protocol", 1002),
        "big frame before Hello": (None, 1009),
    }
    records = read_jsonl(tls_run["work"] / "server.jsonl")
    assert {r["client_id"] for r in records if r["event"] in ("join", "step", "update")} == {"a", "b"}
    assert "refused before its payload was read" in tls_run["server"][1]


def test_a_stranger_cannot_take_over_a_live_session(tls_run) -> None:  # type: ignore[no-untyped-def]
    # Hellos claiming to be "a" came while a was connected: none of them replaced a's connection.
    server_output = tls_run["server"][1]
    assert "reconnected" not in server_output
    assert "reconnections" not in tls_run["a"][1]


def test_a_client_without_the_ca_stops_at_once(tls_run) -> None:  # type: ignore[no-untyped-def]
    code, output = tls_run["no CA"]
    assert code == 1 and "certificate verify failed" in output and "--ca-file" in output
    assert "retrying" not in output  # a certificate that does not verify is not retried


def test_plain_websocket_cannot_talk_to_a_tls_server(tls_run) -> None:  # type: ignore[no-untyped-def]
    code, output = tls_run["plain ws://"]
    assert code == 1 and "cannot reach the server" in output


def test_a_wrong_token_file_stops_the_client(tls_run) -> None:  # type: ignore[no-untyped-def]
    code, output = tls_run["wrong token file"]
    assert code == 1 and "bad_token" in output and "unknown client or wrong token" in output


def test_server_writes_only_its_checkpoints_and_metrics(tls_run) -> None:  # type: ignore[no-untyped-def]
    assert tree(tls_run["cwd"]) == set() and tree(tls_run["home"]) == set() and tree(tls_run["temp"]) == set()
    written = tree(tls_run["work"])
    assert "server.jsonl" in written
    assert all(path == "server.jsonl" or path.startswith("ckpt/") for path in written), sorted(written)


def test_nothing_is_ever_unpickled() -> None:
    """Frames and checkpoints are untrusted bytes: no pickle, no torch.load, no numpy pickles, anywhere in the
    runtime. (safetensors and the protocol's own tensor encoding carry every tensor.)"""
    forbidden = re.compile(
        r"\bimport (pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b"
        r"|\bfrom (pickle|dill|cloudpickle|joblib) import|\bpickle\."
        r"|\btorch\.load\(|allow_pickle\s*=\s*True|\bnp\.load\(|\bnumpy\.load\(|\.loads\(.*marshal"
    )
    offenders = []
    for package in ("edgesplit.client", "edgesplit.server"):
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if forbidden.search(code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_update_file_names_stay_inside_the_checkpoint(tmp_path: Path) -> None:
    """Client ids become file names. The protocol's id rule allows dots: ".." must still be a plain file."""
    adapters = {"w": np.ones((2, 2), np.float32)}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ids = ["..", ".", ".hidden", "a.b", "x" * 64]
    save_checkpoint(tmp_path / "ckpt", Checkpoint(1, adapters, adapters, optimizer, {}, {c: adapters for c in ids}))
    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None and sorted(checkpoint.updates) == sorted(ids)
    assert tree(tmp_path) == {f"ckpt/round-0001/updates/{c}.safetensors" for c in ids} | {
        "ckpt/latest",
        "ckpt/round-0001/global_adapters.safetensors",
        "ckpt/round-0001/tail_lora.safetensors",
        "ckpt/round-0001/tail_optimizer.safetensors",
        "ckpt/round-0001/state.json",
    }
    for bad in ["../escape", "a/b", "", "x" * 65, "nul\x00"]:
        with pytest.raises(ValueError):
            save_checkpoint(tmp_path / "ckpt", Checkpoint(2, adapters, adapters, optimizer, {}, {bad: adapters}))
    assert not (tmp_path / "escape.safetensors").exists()
    loaded = load_latest(tmp_path / "ckpt")
    assert loaded is not None and loaded.round == 1  # the refused writes left the checkpoint as it was


def test_a_revoked_token_ends_its_session_and_is_refused(tiny_artifacts, tmp_path: Path) -> None:
    """Taking a client's line out of --tokens-file and sending SIGHUP disconnects it at once and keeps it out;
    the others train on."""
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    tokens = {client_id: secrets.token_urlsafe(16) for client_id in "abc"}
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("".join(f"{c} {t}\n" for c, t in tokens.items()))
    for client_id, token in tokens.items():
        (tmp_path / f"{client_id}.token").write_text(token)
        write_task(tmp_path / f"{client_id}.jsonl", seed=ord(client_id), count=16)
    port, rounds = free_port(), 4
    url = f"ws://127.0.0.1:{port}"
    with Processes() as run:
        server = run.start(
            "server",
            serve_command(artifacts, port, tmp_path, rounds=rounds, extra=["--tokens-file", str(tokens_file)]),
        )
        server.wait_for("listening on")
        clients = {}
        for client_id in "cab":  # c first, so that it is in round 1 from the start
            token_file = tmp_path / f"{client_id}.token"
            command = client_command(
                url, artifacts, tmp_path / f"{client_id}.jsonl", client_id, tmp_path, ["--token-file", str(token_file)]
            )
            clients[client_id] = run.start(client_id, command)
            if client_id == "c":
                server.wait_for(r"\bc joined")
        clients["c"].wait_for(r"round 1 step 2:")
        tokens_file.write_text("".join(f"{c} {tokens[c]}\n" for c in "ab"))
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(r"c: token revoked; disconnected")
        refused = probe(url, hello_frame("c", manifest, tokens["c"]))  # c's old token no longer opens the door
        outcome = (refused.error, refused.close_code)
        assert clients["c"].wait() == 1
        for client_id in "ab":
            assert clients[client_id].wait() == 0, clients[client_id].output
        assert server.wait() == 0, server.output

    assert outcome == ("bad_token", 1008)
    assert "this client's token was revoked (revoked)" in clients["c"].output
    assert "reloaded 2 tokens" in server.output
    assert f"round {rounds}/{rounds} closed with 2 clients (a, b)" in server.output


def test_an_expired_certificate_is_warned_about(tmp_path: Path) -> None:
    from edgesplit.server.transport import certificate_warnings

    _, cert, _ = make_certificates(tmp_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert certificate_warnings(cert, now) == []
    (expired,) = certificate_warnings(cert, now + datetime.timedelta(days=2))
    assert "expired" in expired and str(cert) in expired
    (early,) = certificate_warnings(cert, now - datetime.timedelta(days=1))
    assert "not valid before" in early
