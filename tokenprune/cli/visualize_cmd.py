"""`tokenprune visualize`: each strategy's kept tokens and scores drawn over the image."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from ..adapters.base import find_adapter
from ..apply import apply
from ..errors import InputError, SpecError
from ..images import load_image
from ..models import DEMO, build_prompt, load
from ..pipeline import Pipeline
from ..spec import split_top_level
from ..visualize import draw, processed_image, stage_maps
from .common import check_device, user_errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


@user_errors
def visualize_command(
    image: Path = typer.Option(..., help="Image file."),
    strategy: str = typer.Option(..., help="Comma-separated specs, e.g. 'vtc-cls@36,random@36'."),
    out: Path = typer.Option(Path("tokenprune-kept.png"), help="Output PNG."),
    model: str = typer.Option(DEMO, help="'demo', a checkpoint path or hub id."),
    prompt: str = typer.Option("describe the image", help="Prompt (query-aware strategies use it)."),
    device: str = typer.Option("cpu", help="Torch device."),
) -> None:
    """Draw the kept tokens (and score heatmap) of each strategy over the image, side by side.

    Example: tokenprune visualize --image scene.png --strategy vtc-cls@36,uniform@36 --out kept.png
    """
    pipelines = [Pipeline.from_spec(s) for s in split_top_level(strategy, ",") if s.strip()]
    if not pipelines:
        raise SpecError(f"--strategy {strategy!r} lists no pipeline; give e.g. vtc-cls@36,uniform@36")
    device = check_device(device)
    picture = load_image(image)
    if out.is_dir() or out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"--out {str(out)!r} must be an image file path ending in {', '.join(IMAGE_SUFFIXES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    hf_model, processor = load(model, device=device)
    adapter = find_adapter(hf_model)
    grid = adapter.info().grid
    inputs = processor(images=picture, text=build_prompt(processor, prompt), return_tensors="pt").to(device)
    panels = []
    for pipeline in pipelines:
        with torch.inference_mode(), apply(hf_model, pipeline) as run:
            hf_model(**inputs)
        record = run.trace[0].stages[0]
        if grid is None or record.tokens_in != grid[0] * grid[1]:
            raise InputError(
                f"visualize draws an image's tokens on one patch grid, but {adapter.model_class} (the "
                f"{adapter.name!r} adapter) gives {record.at} {record.tokens_in} tokens per image in several crops "
                "or a grid of the image's own size; use a LLaVA-1.5 model such as 'demo'"
            )
        kept, scores = stage_maps(record, grid)
        panels.append((pipeline.to_spec(), kept, scores))
    draw(processed_image(processor, inputs["pixel_values"]), panels, out)
    typer.echo(f"wrote {out}")
