"""`edgesplit compare` on a tiny model: all three frameworks, two clients, to completion, bytes as analysed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from loopback import write_task
from tiny_models import save_tiny_model

from edgesplit.client.artifacts import load_manifest
from edgesplit.server.compare import CompareConfig, run_compare
from edgesplit.server.flops import Shapes, client_flops_per_step


def test_compare_runs_all_frameworks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_model("llama", tmp_path / "model")
    # context/completion lines, the E2E form (BLEU, ROUGE-L)
    write_task(tmp_path / "train.jsonl", seed=1, count=40, prompt_key="context")
    write_task(tmp_path / "eval.jsonl", seed=2, count=6, prompt_key="context")
    config = CompareConfig(
        data=tmp_path / "train.jsonl",
        eval_data=tmp_path / "eval.jsonl",
        model=str(model),
        clients=2,
        rounds=1,
        steps_per_round=2,
        cut_layer=1,
        out=tmp_path / "out",
        max_seq_len=16,
        batch_size=2,
        lora_rank=4,
        learning_rate=0.02,
        eval_examples=4,
        train_examples=30,
        proxy_examples=3,
        kd_top_k=4,
        threads=1,
    )
    results = run_compare(config)
    printed = capsys.readouterr().out
    # Its own prefix, a rough estimate first, and one whole-model export for fedllm and kd, not "reused".
    assert "[compare] rough estimate: about" in printed
    assert "[demo]" not in printed and "reusing" not in printed
    assert printed.count("[compare] exported full in") == 1
    manifests = {
        name: load_manifest(config.out / "artifacts" / folder, verify=False)
        for name, folder in (("split", "split-cut1"), ("fedllm", "full"))
    }
    adapter_name_bytes = {name: sum(map(len, m.lora.matrices)) for name, m in manifests.items()}
    assert list(results) == ["split", "fedllm", "kd"]
    for name, result in results.items():
        # approx: math.exp and numpy's exp may differ in the last bit
        assert np.isfinite(result["eval_loss"]) and result["perplexity"] == pytest.approx(np.exp(result["eval_loss"]))
        assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["chrf"] <= 100.0 and 0.0 <= result["rouge_l"] <= 1.0
        # The same training tokens per client whatever the framework: 2 steps of 2 x 16 per client.
        assert result["steps_per_client"] == [2, 2], name
        # The measured traffic per client per round is its analytic payload plus each frame's header and
        # tensor names: within 5% on a real model; on this tiny one the headers weigh more, so allow 1 KiB
        # of them per frame (split sends one frame per step and the adapters; the others one per round),
        # and the adapters' names (layers.<i>.<module path>.lora_A, up to ~32 bytes each) on top.
        frames = 2 + 1 if name == "split" else 1
        names = adapter_name_bytes[name] if name != "kd" else 0
        for way in ("up", "down"):
            analytic, measured = result[f"analytic_{way}"], result[f"bytes_{way}_per_client_round"]
            allowed = analytic * 1.05 + 1024 * frames + names
            assert analytic <= measured <= allowed, (name, way, measured, analytic)
        assert result["client_seconds_per_step"] > 0 and result["peak_rss_mb"] > 0
    assert results["kd"]["analytic_up"] == 3 * 16 * 4 * 12
    assert results["split"]["client_flops_per_step"] < results["fedllm"]["client_flops_per_step"]
    for name in ("compare.md", "compare.csv", "compare.json", "plots/compare.png"):
        assert (config.out / name).stat().st_size > 0
    assert "| split |" in (config.out / "compare.md").read_text()


def test_flops_by_hand() -> None:
    # One layer, H 4, I 8, 2 heads (kv 2): params 2*16 + 2*4*4 + 3*4*8 = 160. B 1, T 2:
    # forward per token 2*160 + 4*2*4 = 352, x 2 tokens = 704; backward the same.
    shapes = Shapes(hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=2, num_layers=3, vocab_size=10)
    assert shapes.layer_params == 160
    assert client_flops_per_step(shapes, 1, 1, 2, lm_head=False)["total"] == 2 * 704
    # The LM head adds 2*H*V per token forward.
    assert client_flops_per_step(shapes, 1, 1, 2, lm_head=True)["forward"] == 704 + 2 * 2 * 4 * 10


def test_the_comparison_plot_is_a_captioned_grid_that_compare_md_embeds(tmp_path: Path) -> None:
    import matplotlib.image

    from edgesplit.server.compare_report import write_comparison

    figures = {"eval_loss": 2.0, "bytes_up_per_client_round": 1e6, "client_flops_per_step": 4e10,
               "client_seconds_per_step": 1.0, "peak_rss_mb": 400.0, "bleu": 0.1, "rouge_l": 0.3,
               "layers_on_device": 4, "num_layers": 30}  # fmt: skip
    results = {name: dict(figures, framework=name) for name in ("split", "fedllm", "kd")}
    caption = "tiny: 2 clients x 1 rounds x 2 steps"
    write_comparison(tmp_path, results, "edgesplit compare ...", 1.0, [], {}, caption)

    markdown = (tmp_path / "compare.md").read_text()
    assert "](plots/compare.png)" in markdown and caption in markdown
    height, width = matplotlib.image.imread(tmp_path / "plots" / "compare.png").shape[:2]
    assert height >= 500 and width / height < 2.5  # a grid, not a strip of panels


def test_compare_estimates_its_time_and_counts_only_the_exports_it_must_make(tmp_path: Path) -> None:
    from edgesplit.server.compare import estimated_seconds
    from edgesplit.server.progress import EXPORT_SECONDS

    config = CompareConfig(data=tmp_path / "t.jsonl", eval_data=tmp_path / "e.jsonl", out=tmp_path / "out")
    both = estimated_seconds(config)
    split_only = estimated_seconds(CompareConfig(**{**config.__dict__, "frameworks": ("split",)}))
    # fedllm and kd share one whole-model export: it is counted once, with their training and scoring.
    assert both > split_only + EXPORT_SECONDS[True]
    assert split_only > EXPORT_SECONDS[False]
