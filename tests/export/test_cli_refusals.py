"""`edgesplit export` refuses a bad --cut-layer or --model before any model loads: the models here have a
config (or a GGUF header) that says 4 layers and weights that cannot be read, so a refusal that came after
loading would fail differently, and a subprocess shows that neither torch nor transformers was imported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgesplit.errors import ExportError
from edgesplit.export import cli
from edgesplit.export.preflight import check_model_name, known_depth

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def four_layer_dir(tmp_path: Path) -> Path:
    """A model directory whose config says 4 layers and whose weights are not a safetensors file."""
    directory = tmp_path / "four-layers"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (directory / "model.safetensors").write_bytes(b"not weights at all")
    return directory


@pytest.fixture
def four_layer_gguf(tmp_path: Path) -> Path:
    """A GGUF file with a header that says 4 blocks and no tensors."""
    from gguf import GGUFWriter

    path = tmp_path / "four-layers.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export(*args: str) -> None:
    cli.main(["--out", "/nonexistent/never-written", *args])


@pytest.mark.parametrize("cut_layer", ["0", "-1"])
def test_a_cut_below_one_is_refused_whatever_the_model(cut_layer: str) -> None:
    with pytest.raises(ExportError, match=f"--cut-layer {cut_layer} is out of range: a cut must be at least 1"):
        export("--model", "owner/some-hub-model", "--cut-layer", cut_layer)


@pytest.mark.parametrize("cut_layer", ["4", "99"])
def test_a_cut_past_a_directorys_depth_is_refused_from_its_config(four_layer_dir: Path, cut_layer: str) -> None:
    assert known_depth(str(four_layer_dir)) == 4
    with pytest.raises(ExportError, match="this model has 4 layers, so a cut must be between 1 and 3"):
        export("--model", str(four_layer_dir), "--cut-layer", cut_layer)


def test_a_cut_past_a_gguf_files_depth_is_refused_from_its_header(four_layer_gguf: Path) -> None:
    assert known_depth(str(four_layer_gguf)) == 4
    with pytest.raises(ExportError, match="this model has 4 layers"):
        export("--model", str(four_layer_gguf), "--cut-layer", "4")


def test_the_default_models_depth_is_known_without_fetching_it() -> None:
    with pytest.raises(ExportError, match="this model has 30 layers, so a cut must be between 1 and 29"):
        export("--model", "smollm2-135m", "--cut-layer", "30")


def test_a_hub_ids_depth_is_left_to_the_loader() -> None:
    assert known_depth("owner/some-hub-model") is None


def test_a_mistyped_alias_is_refused_with_the_closest_one() -> None:
    with pytest.raises(ExportError, match="unknown model 'smollm2-13m'.*did you mean 'smollm2-135m'"):
        export("--model", "smollm2-13m", "--cut-layer", "2")
    with pytest.raises(ExportError, match="--model takes a Hugging Face hub id") as refused:
        check_model_name("no such model!")
    assert "did you mean" not in str(refused.value)


def test_paths_that_do_not_exist_are_refused(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "gone"), "./gone", "~/gone", "gone.gguf", str(tmp_path / "a" / "b" / "c")):
        with pytest.raises(ExportError, match="no such file or directory"):
            check_model_name(missing)
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(ExportError, match="neither a model directory nor a .gguf file"):
        check_model_name(str(not_a_model))


def test_what_could_be_a_model_passes(four_layer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "owner/model.v2_x-1", str(four_layer_dir)):
        check_model_name(name)
    # A bare name may be one of the hub's oldest models, which have no owner; a near miss of a known name is
    # refused as a typo unless the hub's cache holds it.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model_name("gpt2")
    with pytest.raises(ExportError, match="did you mean 'smollm2-135m'"):
        check_model_name("smollm2-13m")
    (tmp_path / "hub" / "models--smollm2-13m").mkdir(parents=True)
    check_model_name("smollm2-13m")


def test_the_refusal_comes_before_torch_or_transformers_is_imported(four_layer_dir: Path) -> None:
    code = (
        "import sys\n"
        "from edgesplit.errors import ExportError\n"
        "from edgesplit.export import cli\n"
        "try:\n"
        f"    cli.main(['--model', {str(four_layer_dir)!r}, '--cut-layer', '7'])\n"
        "except ExportError as error:\n"
        "    print('refused:', error)\n"
        "print('heavy imported:', 'torch' in sys.modules or 'transformers' in sys.modules)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "refused: --cut-layer 7 is out of range: this model has 4 layers" in result.stdout
    assert "heavy imported: False" in result.stdout
    assert elapsed < 20  # a model load alone takes longer; the refusal is an interpreter start and a JSON read


def test_the_command_prints_the_refusal_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgesplit", "export", "--model", "smollm2-13m", "--cut-layer", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "did you mean 'smollm2-135m'?" in result.stderr


def test_every_option_has_help_and_the_description_names_no_module() -> None:
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert parser.description is not None
    assert "edgesplit.export" not in parser.description and ".py" not in parser.description


def _unloadable_model_dir(tmp_path: Path, config: dict[str, object]) -> Path:
    """A model directory with this config.json and weights that cannot be read: a refusal must come first."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"not weights at all")
    return directory


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "mixture-of-experts"),
        ({"model_type": "qwen2", "num_experts": 4, "architectures": ["Qwen2ForCausalLM"]}, "mixture-of-experts"),
        ({"model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
        ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "not a causal LM"),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "not a causal LM"),
    ],
)
def test_an_architecture_that_cannot_be_split_is_refused_from_its_config(
    tmp_path: Path, config: dict[str, object], reason: str
) -> None:
    from edgesplit.export.preflight import check_architecture

    with pytest.raises(ExportError, match=reason):
        check_architecture(str(_unloadable_model_dir(tmp_path, config)))


def test_a_layout_no_adapter_describes_is_refused_before_the_weights_load(tmp_path: Path) -> None:
    """BLOOM keeps its layers in transformer.h and normalises its embeddings inside the backbone: no adapter
    describes it, and its weights are never read."""
    from edgesplit.export.exporter import ExportConfig
    from edgesplit.export.exporter import export as run_export

    config = {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "hidden_size": 16,
        "n_head": 2,
        "n_layer": 2,
        "vocab_size": 32,
    }
    model = _unloadable_model_dir(tmp_path, config)
    with pytest.raises(ExportError, match="'bloom' is not supported: its layers are not laid out"):
        run_export(ExportConfig(model=str(model), cut_layer=1, out=tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_a_mixture_of_experts_gguf_is_refused_from_its_header(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    from edgesplit.export.preflight import check_architecture

    path = tmp_path / "moe.gguf"
    writer = GGUFWriter(str(path), "qwen2moe")
    writer.add_block_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="mixture-of-experts"):
        check_architecture(str(path))
