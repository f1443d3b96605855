"""Turning demo samples into model inputs, in bulk and without the per-sample processor cost."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
from torch import Tensor

from .scenes import Question, Scene, sample


def _samples(args: tuple[str, int, int]) -> tuple[np.ndarray, list[Scene], list[Question]]:
    split, start, stop = args
    pairs = [sample(split, i) for i in range(start, stop)]
    return np.stack([s.render() for s, _ in pairs]), [s for s, _ in pairs], [q for _, q in pairs]


def render_split(
    split: str, n: int, workers: int = 1, start: int = 0
) -> tuple[np.ndarray, list[Scene], list[Question]]:
    """Samples `start..start+n` of `split`: images `[n, 96, 96, 3]` uint8, scenes, questions."""
    chunk = max(1, n // (workers * 4) or 1)
    jobs = [(split, i, min(i + chunk, start + n)) for i in range(start, start + n, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_samples, jobs))
    else:
        parts = [_samples(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts])
    return images, [s for p in parts for s in p[1]], [q for p in parts for q in p[2]]


def normalise(images: Tensor) -> Tensor:
    """`[B, H, W, 3]` uint8 -> `[B, 3, H, W]` float, as the demo's CLIP image processor does."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
