"""A GGUF model's float32 copy: the first load saves it, later loads read it and get the same model and
tokenizer; a damaged copy is replaced, an unwritable cache costs only the speed-up, and the copy can be
turned off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgesplit.export.models import GGUF_COPY_DONE, LoadedModel, gguf_copy_dir, load_gguf_tokenizer, load_model


@pytest.fixture
def gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tiny_models import save_tiny_gemma3_gguf

    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGESPLIT_GGUF_COPY", raising=False)
    return save_tiny_gemma3_gguf(tmp_path / "tiny-gemma3.gguf")


def assert_same(first: LoadedModel, second: LoadedModel) -> None:
    assert (first.source, first.sha256) == (second.source, second.sha256)
    one, two = first.model.state_dict(), second.model.state_dict()
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)
    assert first.model.config.tie_word_embeddings == second.model.config.tie_word_embeddings
    assert first.tokenizer.backend_tokenizer.to_str() == second.tokenizer.backend_tokenizer.to_str()
    assert first.tokenizer.eos_token_id == second.tokenizer.eos_token_id


def test_the_first_load_saves_a_copy_that_later_loads_read(gguf_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    first = load_model(str(gguf_file))
    copy = gguf_copy_dir(first.sha256)
    assert (copy / GGUF_COPY_DONE).is_file() and (copy / "model.safetensors").is_file()
    assert "saved a float32 copy" in capfd.readouterr().err

    second = load_model(str(gguf_file))
    assert f"from its float32 copy in {copy}" in capfd.readouterr().err
    assert_same(first, second)
    tokenizer = load_gguf_tokenizer(gguf_file)  # the demo's, to size its window: the copy's, the same
    assert (
        tokenizer.name_or_path == str(copy)
        and tokenizer.backend_tokenizer.to_str() == second.tokenizer.backend_tokenizer.to_str()
    )
    # Tied: the embedding table is saved once, and the LM head is the same tensor again.
    assert (
        second.model.get_output_embeddings().weight.data_ptr() == second.model.get_input_embeddings().weight.data_ptr()
    )


def test_a_damaged_copy_is_read_past_and_replaced(gguf_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    first = load_model(str(gguf_file))
    copy = gguf_copy_dir(first.sha256)
    (copy / GGUF_COPY_DONE).unlink()  # as if the copy were half-written
    (copy / "model.safetensors").write_bytes(b"truncated")
    capfd.readouterr()

    second = load_model(str(gguf_file))
    assert "dequantising GGUF weights" in capfd.readouterr().err
    assert_same(first, second)
    assert (copy / GGUF_COPY_DONE).is_file()
    assert_same(first, load_model(str(gguf_file)))  # read from the new copy


def test_an_unwritable_cache_costs_only_the_speed_up(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("EDGESPLIT_CACHE", str(blocked))
    loaded = load_model(str(gguf_file))
    assert "could not save a float32 copy" in capfd.readouterr().err
    assert loaded.model.config.num_hidden_layers > 0


def test_the_copy_can_be_turned_off(gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPLIT_GGUF_COPY", "0")
    loaded = load_model(str(gguf_file))
    assert not gguf_copy_dir(loaded.sha256).exists()
