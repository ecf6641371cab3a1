from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

from tiny_models import FAMILY_CONFIGS, save_tiny_model  # noqa: E402

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Export on demand, once per (family, cut_layer, options) for the whole session."""
    from edgesplit.export.exporter import ExportConfig, export

    root = tmp_path_factory.mktemp("artifacts")
    made: dict[tuple[object, ...], Path] = {}

    def get(family: str, cut_layer: int = 1, **options: object) -> Path:
        key = (family, cut_layer, tuple(sorted(options.items())))
        if key not in made:
            out = root / f"{family}-{cut_layer}-{len(made)}"
            settings = dict(batch_size=2, max_seq_len=16, lora_rank=4, lora_alpha=8.0)
            settings.update(options)
            export(ExportConfig(model=str(tiny_model_dirs[family]), cut_layer=cut_layer, out=out, **settings))  # type: ignore[arg-type]
            made[key] = out
        return made[key]

    return get
