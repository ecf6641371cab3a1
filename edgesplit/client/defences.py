"""What the device may do to its activations before they go up: clip each token's hidden vector, then add noise.

`edgesplit client --activation-noise SIGMA [--activation-clip C]`. For each token t of the (B, T, H)
activations at the cut:

    h_t <- h_t * min(1, C / ||h_t||)                           (only with --activation-clip C)
    h_t <- h_t + n_t,   n_t ~ N(0, (SIGMA * ||h_t|| / sqrt(H))^2 I_H)

so the noise vector's expected norm is about SIGMA times the (clipped) token's norm: SIGMA is a noise-to-signal
ratio, 0.1 a tenth of the signal, 1.0 as much noise as signal. This is the shape of the hidden-state defences
in the split-learning literature: norm clipping followed by Gaussian noise on the smashed data or the
forward-pass embeddings (Du et al., "DP-Forward", CCS 2023; Mai et al., "Split-and-Denoise", ICML 2024;
FedSEA-LLaMA's noise on hidden states), and what Chen et al. (CCS 2024, "Unveiling the Vulnerability of Private
Fine-Tuning in Split-Based Frameworks for Large Language Models") attack. Scaling the noise to each token's own
norm keeps the ratio the same for every token, whatever its layer's scale; it also means the noise is
data-dependent, so this is *not* differential privacy (docs/security.md says what it is and is not).

The gradient that comes back is taken through the clip exactly (the Jacobian of h * C / ||h||) and straight
through the noise: the noise's scale is treated as a constant, as DP-SGD treats its clip norm.

The noise comes from the operating system's entropy, never from the run's seed: the server chose that seed,
and noise it could replay would hide nothing from it. numpy only, like the rest of the client.
"""

from __future__ import annotations

import math

import numpy as np

from edgesplit.errors import EdgesplitError

MAX_SIGMA = 10.0  # ten times the signal: nothing trains under more, and the server caps an activation's RMS
_TINY = 1e-12


class ActivationDefence:
    """Clip each token's hidden vector to norm `clip` (if given), then add Gaussian noise of `sigma` times its
    norm. `rng` is for tests; by default fresh entropy from the operating system."""

    def __init__(self, sigma: float, clip: float | None = None, rng: np.random.Generator | None = None) -> None:
        if not (math.isfinite(sigma) and 0 < sigma <= MAX_SIGMA):
            raise EdgesplitError(
                f"--activation-noise {sigma!r} is not a number above 0 and at most {MAX_SIGMA:g}: it is the noise's "
                "norm as a fraction of each token's, for example 0.1 or 0.3; leave the flag out for no noise"
            )
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise EdgesplitError(
                f"--activation-clip {clip!r} is not a number above 0: it is the largest norm a token's hidden "
                "vector may have before the noise is added"
            )
        self.sigma = float(sigma)
        self.clip = None if clip is None else float(clip)
        self.rng = rng if rng is not None else np.random.default_rng()

    def describe(self) -> str:
        """One line for the client's log and summary: what the server receives."""
        clip = "" if self.clip is None else f", each token first clipped to norm {self.clip:g}"
        return f"activations noised: Gaussian noise of {self.sigma:g} x each token's norm{clip}"

    def to_json(self) -> dict[str, float | None]:
        return {"sigma": self.sigma, "clip": self.clip}

    def _clip_scale(self, activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each token's norm (B, T, 1) and the factor its vector is scaled by (1 where it is within the clip)."""
        norms = np.linalg.norm(activations.astype(np.float64), axis=-1, keepdims=True)
        if self.clip is None:
            return norms, np.ones_like(norms)
        return norms, np.minimum(1.0, self.clip / np.maximum(norms, _TINY))

    def apply(self, activations: np.ndarray) -> np.ndarray:
        """The (B, T, H) activations as they go up: clipped, then noised. Every position is noised, padding too."""
        norms, scale = self._clip_scale(activations)
        clipped = activations.astype(np.float64) * scale
        std = self.sigma * norms * scale / math.sqrt(activations.shape[-1])
        noise = self.rng.standard_normal(activations.shape) * std
        noised: np.ndarray = (clipped + noise).astype(activations.dtype)
        return noised

    def backward(self, activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """The gradient at the clean `activations` from the server's gradient at the uploaded ones: through the
        clip exactly, straight through the noise. Grads of the wrong shape pass as they are, for the head to
        refuse."""
        if self.clip is None or grads.shape != activations.shape:
            return grads
        norms, scale = self._clip_scale(activations)
        h = activations.astype(np.float64)
        g = grads.astype(np.float64)
        unit = h / np.maximum(norms, _TINY)
        clipped = scale < 1.0
        # d(C h/||h||)/dh = (C/||h||) (I - u u^T), u = h/||h||: remove g's part along u, then scale.
        projected = g - unit * np.sum(unit * g, axis=-1, keepdims=True)
        through: np.ndarray = np.where(clipped, scale * projected, g).astype(grads.dtype)
        return through
