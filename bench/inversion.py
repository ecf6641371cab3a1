"""The curious server: how many of a device's tokens can it recover from the activations at the cut? Prints JSON.

    nice -n 10 python bench/inversion.py [--cuts 1-8] [--noise 0,0.1,0.3,1.0] [--work-dir /tmp/inversion]
    python bench/inversion.py --tiny        # a seconds-long smoke run on a tiny random model

The server knows the public base model (SmolLM2-135M, the embedded default) and sees, with every step, each
token's hidden vector after the first `cut` layers, noised as `edgesplit client --activation-noise SIGMA`
noises it (the client's own function, edgesplit/client/defences.py). The device's data are private E2E test
lines (prompt and completion, as the client encodes them); the server also has public text of the same kind
(E2E's train split). Two attacks, each scored as the share of the device's tokens recovered exactly:

- nearest neighbour through the first layers: for each candidate token x (every token of the public text),
  the server runs x through the same first `cut` layers, after a one-token prefix (the public text's most
  common first token; alone, for position 0), and keeps that vector; each observed vector is then read as
  the candidate whose vector is nearest in cosine, after standardising every channel with the public text's
  mean and spread at that cut (so that the few huge channels do not decide alone). It ignores the context
  of each position: cheap (one short forward pass per candidate), and a lower bound on what a search in
  context would recover.
- a learned linear decoder: a ridge-regression classifier from the (standardised) hidden vector to the token,
  fitted in closed form on the public text's hidden vectors at that cut, noised at the same SIGMA (the server
  is assumed to know the defence's setting). Trained on public text only, evaluated on the private lines.

Both can only name tokens that occur in the public text; `candidate_coverage` is the share of the private
tokens that do, the ceiling of both. Beside the table, the eval-loss cost of each noise level: a short real
split run (`edgesplit serve` and `edgesplit client --activation-noise SIGMA` on loopback, bench/split_train.py's
machinery) at one cut, the same batches for every level.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine
from split_train import E2E, split_run

from edgesplit.client.data import EncodedSet, encode_examples, read_jsonl
from edgesplit.client.defences import ActivationDefence

REPO = Path(__file__).resolve().parent.parent
RIDGE = 1e-3  # the ridge penalty, times the number of training vectors, on standardised features


def cut_list(text: str) -> list[int]:
    """'1-8' or '1,2,4' -> [1, ..., 8] or [1, 2, 4]."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-"))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",") if part.strip()]


# ------------------------------------------------------------------------------------------------ the model


def tiny_model(work: Path) -> str:
    """The tests' tiny random Llama, saved into `work` (the bench does not otherwise import the tests)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny_model

    return str(save_tiny_model("llama", work / "tiny-llama", num_hidden_layers=4))


def tiny_lines(count: int, offset: int) -> list[str]:
    """Prompt/completion lines in the tiny tokenizer's words (w0..w95)."""
    rng = np.random.default_rng(offset)
    lines = []
    for _ in range(count):
        words = [f"w{i}" for i in rng.integers(0, 96, size=8)]
        lines.append(json.dumps({"prompt": " ".join(words[:5]), "completion": " ".join(words[5:])}))
    return lines


class Attacker:
    """The server's copy of the public model's first layers, and what it computes with them."""

    def __init__(self, model_name: str, max_cut: int, max_seq_len: int) -> None:
        import torch

        from edgesplit.export.models import load_model

        loaded = load_model(model_name)
        self.model = loaded.model
        # Only the first layers are ever run: drop the rest (and their memory).
        self.model.model.layers = self.model.model.layers[:max_cut]
        self.model.config.num_hidden_layers = max_cut
        self.tokenizer = loaded.tokenizer.backend_tokenizer
        self.eos = loaded.tokenizer.eos_token_id
        pad = loaded.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos or 0)
        self.max_seq_len = max_seq_len
        self.torch = torch

    def encode(self, path: Path) -> EncodedSet:
        return encode_examples(self.tokenizer, read_jsonl(path), self.max_seq_len, self.eos, self.pad)

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray, cuts: list[int]) -> dict[int, np.ndarray]:
        """Each real token's hidden vector after `cut` layers, (tokens, H) per cut, row by row (mask order)."""
        torch = self.torch
        out: dict[int, list[np.ndarray]] = {cut: [] for cut in cuts}
        lengths = attention_mask.sum(axis=1)
        with torch.no_grad():
            for start in range(0, len(input_ids), 8):
                rows = slice(start, start + 8)
                width = int(lengths[rows].max())  # right-padded: the columns past the longest row are padding
                ids = torch.from_numpy(input_ids[rows, :width])
                mask = torch.from_numpy(attention_mask[rows, :width])
                states = self.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                keep = attention_mask[rows, :width].astype(bool)
                for cut in cuts:
                    out[cut].append(states[cut].float().numpy()[keep])
        return {cut: np.concatenate(parts) for cut, parts in out.items()}

    def candidate_tables(self, candidates: np.ndarray, anchor: int, cuts: list[int]) -> dict[int, np.ndarray]:
        """For each cut, (2, C, H): each candidate alone at position 0, and after `anchor` at position 1."""
        torch = self.torch
        alone: dict[int, list[np.ndarray]] = {cut: [] for cut in cuts}
        after: dict[int, list[np.ndarray]] = {cut: [] for cut in cuts}
        with torch.no_grad():
            for start in range(0, len(candidates), 512):
                chunk = torch.from_numpy(candidates[start : start + 512]).long()
                pairs = torch.stack([torch.full_like(chunk, anchor), chunk], dim=1)
                single = self.model.model(input_ids=chunk[:, None], output_hidden_states=True).hidden_states
                double = self.model.model(input_ids=pairs, output_hidden_states=True).hidden_states
                for cut in cuts:
                    alone[cut].append(single[cut][:, 0].float().numpy())
                    after[cut].append(double[cut][:, 1].float().numpy())
        return {cut: np.stack([np.concatenate(alone[cut]), np.concatenate(after[cut])]) for cut in cuts}


# ------------------------------------------------------------------------------------------------ the attacks


def standardise(values: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    out: np.ndarray = ((values - mean) / spread).astype(np.float32)
    return out


def nearest_neighbour(
    observed: np.ndarray, first: np.ndarray, tables: np.ndarray, mean: np.ndarray, spread: np.ndarray
) -> np.ndarray:
    """The candidate index nearest in cosine (standardised) to each observed vector; `first` marks position 0."""
    guesses = np.empty(len(observed), dtype=np.int64)
    for which, rows in ((0, first), (1, ~first)):
        if not rows.any():
            continue
        table = standardise(tables[which], mean, spread)
        table /= np.linalg.norm(table, axis=1, keepdims=True) + 1e-12
        query = standardise(observed[rows], mean, spread)
        guesses[rows] = np.argmax(query @ table.T, axis=1)
    return guesses


def ridge_decoder(features: np.ndarray, classes: np.ndarray, count: int) -> np.ndarray:
    """(H + 1, count) weights of a ridge-regression classifier onto one-hot targets, bias in the last row."""
    import torch

    x = torch.from_numpy(np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1))
    gram = (x.T @ x).double() + RIDGE * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    # x^T Y for one-hot Y, without building Y: each vector added to its class's row.
    targets = torch.zeros(count, x.shape[1], dtype=torch.float64).index_add_(0, torch.from_numpy(classes), x.double())
    weights: np.ndarray = torch.linalg.solve(gram, targets.T).float().numpy()
    return weights


def decode(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    x = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    out: np.ndarray = np.argmax(x @ weights, axis=1)
    return out


def first_positions(attention_mask: np.ndarray) -> np.ndarray:
    """For the tokens in mask order: True at each row's position 0."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    first: np.ndarray = positions[attention_mask.astype(bool)] == 0
    return first


# ------------------------------------------------------------------------------------------------ the run


def write_lines(work: Path, tiny: bool, public_lines: int, private_lines: int) -> tuple[Path, Path]:
    public, private = work / "public.jsonl", work / "private.jsonl"
    if tiny:
        public.write_text("\n".join(tiny_lines(public_lines, 1)) + "\n")
        private.write_text("\n".join(tiny_lines(private_lines, 2)) + "\n")
        return public, private
    if not E2E.is_dir():
        sys.exit(f"the E2E data set is expected at {E2E}")
    # Many distinct contexts rather than the references of a few: every 5th train line, every 9th test line.
    lines = (E2E / "train.jsonl").read_text().splitlines()
    public.write_text("\n".join(lines[::5][:public_lines]) + "\n")
    lines = (E2E / "test.jsonl").read_text().splitlines()
    private.write_text("\n".join(lines[::9][:private_lines]) + "\n")
    return public, private


def attack_table(args: argparse.Namespace, model_name: str, work: Path, noise: list[float]) -> dict[str, Any]:
    cuts = cut_list(args.cuts)
    attacker = Attacker(model_name, max(cuts), args.max_seq_len)
    public_path, private_path = write_lines(work, args.tiny, args.public_lines, args.private_lines)
    public, private = attacker.encode(public_path), attacker.encode(private_path)
    public_tokens = public.input_ids[public.attention_mask.astype(bool)]
    private_tokens = private.input_ids[private.attention_mask.astype(bool)]
    private_prompt = private.labels[private.attention_mask.astype(bool)] < 0
    # The candidates: every token of all the public lines (tokenizing is cheap; the forward passes are not).
    all_public = attacker.encode(public_path if args.tiny else E2E / "train.jsonl")
    candidates = np.unique(all_public.input_ids[all_public.attention_mask.astype(bool)])
    index = {int(token): i for i, token in enumerate(candidates)}
    truth = np.array([index.get(int(token), -1) for token in private_tokens])
    public_classes = np.array([index[int(token)] for token in public_tokens])
    anchor = collections.Counter(public.input_ids[:, 0].tolist()).most_common(1)[0][0]
    started = time.time()
    public_hidden = attacker.hidden(public.input_ids, public.attention_mask, cuts)
    private_hidden = attacker.hidden(private.input_ids, private.attention_mask, cuts)
    tables = attacker.candidate_tables(candidates, int(anchor), cuts)
    forward_seconds = time.time() - started
    first = first_positions(private.attention_mask)
    rng = np.random.default_rng(args.seed)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {"nearest_neighbour": {}, "linear_decoder": {}}
    for cut in cuts:
        mean = public_hidden[cut].mean(axis=0)
        spread = public_hidden[cut].std(axis=0) + 1e-6
        for attack in results:
            results[attack][str(cut)] = {}
        for sigma in noise:
            defence = None if sigma == 0 else ActivationDefence(sigma, rng=rng)

            def noised(values: np.ndarray, defence: ActivationDefence | None = defence) -> np.ndarray:
                return values if defence is None else defence.apply(values)

            observed = noised(private_hidden[cut])
            guesses = {
                "nearest_neighbour": nearest_neighbour(observed, first, tables[cut], mean, spread),
                "linear_decoder": decode(
                    standardise(observed, mean, spread),
                    ridge_decoder(
                        standardise(noised(public_hidden[cut]), mean, spread), public_classes, len(candidates)
                    ),
                ),
            }
            for attack, guess in guesses.items():
                right = guess == truth
                results[attack][str(cut)][f"{sigma:g}"] = {
                    "all_tokens": round(float(right.mean()), 4),
                    "prompt_tokens": round(float(right[private_prompt].mean()), 4),
                }
    return {
        "cuts": cuts,
        "recovery": results,
        "sizes": {
            "private_lines": len(private.input_ids),
            "private_tokens": len(private_tokens),
            "private_prompt_tokens": int(private_prompt.sum()),
            "public_lines_for_the_decoder": len(public.input_ids),
            "public_tokens_for_the_decoder": len(public_tokens),
            "candidates": len(candidates),
            "candidate_coverage": round(float((truth >= 0).mean()), 4),
            # The decoder can only name tokens it saw in training: its ceiling is lower than the candidates'.
            "decoder_coverage": round(float(np.isin(private_tokens, public_tokens).mean()), 4),
            "max_seq_len": args.max_seq_len,
        },
        "anchor_token": attacker.tokenizer.id_to_token(int(anchor)),
        "forward_seconds": round(forward_seconds, 1),
        "attack_seconds": round(time.time() - started - forward_seconds, 1),
    }


def training_cost(args: argparse.Namespace, model_name: str, work: Path, noise: list[float]) -> dict[str, Any]:
    """A short real split run per noise level at --train-cut: the eval loss after, and its cost over no noise."""
    from split_train import write_subsets

    from edgesplit.export.exporter import ExportConfig, export

    artifacts = work / f"artifacts-cut{args.train_cut}"
    if not (artifacts / "manifest.json").exists():
        # E2E's lines are 40 to 90 tokens: 96 holds them at three quarters of the default 128's compute.
        options = dict(batch_size=2, max_seq_len=16, lora_rank=4, lora_alpha=8.0) if args.tiny else {"max_seq_len": 96}
        export(ExportConfig(model=model_name, cut_layer=args.train_cut, out=artifacts, force=True, **options))  # type: ignore[arg-type]
    if args.tiny:
        train, test = work / "train.jsonl", work / "eval.jsonl"
        train.write_text("\n".join(tiny_lines(16, 3)) + "\n")
        test.write_text("\n".join(tiny_lines(8, 4)) + "\n")
    else:
        train, test = write_subsets(work, 400, 64)
    runs: dict[str, dict[str, Any]] = {}
    # The smoke run trains only without noise and at the largest level: each run starts two processes.
    for sigma in [noise[0], noise[-1]] if args.tiny else noise:
        extra = () if sigma == 0 else ("--activation-noise", f"{sigma:g}")
        run = split_run(
            artifacts, train, test, "fp32", args.train_steps, work, args.learning_rate, f"noise{sigma:g}", extra, 4
        )
        runs[f"{sigma:g}"] = {
            "eval_loss_before": run["eval_loss_before"],
            "eval_loss_after": run["eval_loss_after"],
            "step_seconds_median": run["step_seconds_median"],
        }
    base = runs[f"{noise[0]:g}"]["eval_loss_after"]
    for run in runs.values():
        run["eval_loss_relative_to_no_noise"] = round((run["eval_loss_after"] - base) / base, 4)
    return {
        "cut_layer": args.train_cut,
        "steps": args.train_steps,
        "learning_rate": args.learning_rate,
        "train_lines": 400,
        "eval_batches": 4,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and made-up lines: a smoke run")
    parser.add_argument("--cuts", default=None, help="cut layers to attack (default 1-8; 1-4 with --tiny)")
    parser.add_argument("--noise", default="0,0.1,0.3,1.0", help="noise levels SIGMA, the first 0 (no noise)")
    parser.add_argument("--private-lines", type=int, default=None, help="the device's lines (default 80)")
    parser.add_argument("--public-lines", type=int, default=None, help="public lines for the decoder (default 200)")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--train-cut", type=int, default=None, help="the cut of the eval-loss runs (default 4)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each eval-loss run (default 20)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--no-training", action="store_true", help="the attacks only, no eval-loss runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/edgesplit-inversion"))
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.cuts = args.cuts or ("1-4" if tiny else "1-8")
    # Sized for about 20 minutes on a loaded 2-core machine: the forward passes through 8 layers dominate.
    args.private_lines = args.private_lines or (8 if tiny else 80)
    args.public_lines = args.public_lines or (64 if tiny else 200)
    args.train_steps = args.train_steps or (2 if tiny else 20)
    args.train_cut = args.train_cut or (1 if tiny else 4)
    if tiny:
        args.max_seq_len = 16
    noise = [float(part) for part in args.noise.split(",") if part.strip()]
    if not noise or noise[0] != 0 or any(not (math.isfinite(s) and s >= 0) for s in noise):
        parser.error("--noise takes levels of at least 0, the first of them 0 (the run without noise)")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    before = machine()
    model_name = tiny_model(work) if tiny else "smollm2-135m"
    result: dict[str, Any] = {
        "benchmark": "inversion",
        "model": "tiny random llama" if tiny else "smollm2-135m",
        "command": " ".join(["python bench/inversion.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": before,
        "noise_levels": noise,
        "noise_meaning": "SIGMA: Gaussian noise of SIGMA x each token's norm (edgesplit client --activation-noise)",
        "attacks": {
            "nearest_neighbour": "each candidate token run through the first layers after a fixed one-token prefix "
            "(alone at position 0); an observed vector is read as the nearest candidate in cosine after per-channel "
            "standardisation; context ignored",
            "linear_decoder": "ridge-regression classifier, hidden vector -> token, fitted on the public lines' hidden "
            "vectors noised at the same SIGMA",
        },
    }
    with contextlib.redirect_stdout(sys.stderr):  # the loaders' and the exporter's progress: stdout is the JSON's
        result.update(attack_table(args, model_name, work, noise))
        if not args.no_training:
            result["training_cost"] = training_cost(args, model_name, work, noise)
    result["load_average_after"] = machine()["load_average"]
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
