"""`tokenprune run`: one image, one prompt, one pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from ..apply import apply
from ..images import load_image
from ..models import build_prompt, load
from ..pipeline import Pipeline
from .common import check_device, print_json, user_errors


@user_errors
def run_command(
    model: str = typer.Option("demo", help="Checkpoint path, hub id, or 'demo' (the bundled model)."),
    image: Path = typer.Option(..., exists=False, help="Image file."),
    prompt: str = typer.Option(..., help="Question about the image."),
    strategy: str = typer.Option(..., help="Pipeline spec, e.g. 'vtc-cls@64'."),
    max_new_tokens: int = typer.Option(16, min=1, help="Tokens to generate."),
    positions: str = typer.Option("contiguous", help="Position ids of kept tokens: contiguous or original."),
    device: str = typer.Option("cpu", help="Torch device."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate an answer with the visual tokens compressed by a pipeline.

    Example: tokenprune run --model demo --image scene.png --prompt "what colour is the circle?"
    --strategy vtc-cls@36 --json
    """
    pipeline = Pipeline.from_spec(strategy)
    device = check_device(device)
    picture = load_image(image)
    hf_model, processor = load(model, device=device)
    text = build_prompt(processor, prompt)
    inputs = processor(images=picture, text=text, return_tensors="pt").to(device)
    with torch.inference_mode(), apply(hf_model, pipeline, positions=positions) as run:
        output = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    forward = run.trace[0]
    result = {
        "text": answer,
        "strategy": pipeline.to_spec(),
        "model": model,
        "seq_len_in": forward.seq_len_in,
        "seq_len_out": forward.seq_len_out,
        "layer_tokens": forward.layer_tokens,
        "llm_flops": forward.llm_flops(),
        "vision_flops": forward.vision_flops(),
        "vision_tokens": forward.vision_tokens,
        "stages": [s.to_json() for s in forward.stages],
    }
    if json_out:
        print_json(result)
        return
    typer.echo(answer)
    for stage in forward.stages:
        typer.echo(f"[{stage.stage}] {stage.tokens_in} -> {stage.tokens_out} visual tokens per image", err=True)
