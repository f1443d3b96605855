"""Pictures of what a strategy keeps: the image, its score heatmap, pruned patches greyed out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from .trace import StageRecord


def processed_image(processor: Any, pixel_values: torch.Tensor) -> np.ndarray:
    """The model's view of the image, `[H, W, 3]` in [0, 1], undoing the processor's normalisation."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    return rearrange((pixel_values[0].float().cpu() * std + mean).clamp(0, 1), "c h w -> h w c").numpy()


def stage_maps(record: StageRecord, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Kept mask and score map of the first image, each `[rows, cols]`."""
    kept = np.zeros(grid[0] * grid[1], dtype=bool)
    kept[record.kept[0].cpu().numpy()] = True
    scores = None if record.scores is None else record.scores[0].float().cpu().numpy().reshape(grid)
    return kept.reshape(grid), scores


def draw(image: np.ndarray, panels: list[tuple[str, np.ndarray, np.ndarray | None]], out: str | Path) -> None:
    """Save a row: the image, then for each strategy its heatmap and kept patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.6), dpi=130, layout="constrained")
    axes[0].imshow(image)
    axes[0].set_title("input")
    h, w = image.shape[:2]
    for ax, (title, kept, scores) in zip(axes[1:], panels, strict=False):
        up = np.kron(kept, np.ones((h // kept.shape[0], w // kept.shape[1])))[..., None]
        ax.imshow(image * (0.25 + 0.75 * up))
        if scores is not None:
            ax.imshow(scores, cmap="inferno", alpha=0.35, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(f"{title}\n{int(kept.sum())} of {kept.size} kept", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.savefig(out)
    plt.close(fig)
