"""Can a small Qwen2-VL LLM read a token's column from M-RoPE? The probe behind demo-qwen's rotary base.

A 2-layer, 64-wide Qwen2-VL text model sees a prompt laid out as demo-qwen's (3 text tokens, a 6x6
grid of image tokens with their M-RoPE (time, row, column) positions, text after it). The image
tokens are noise but one, which carries a learned marker; the last token must say whether the marker
is in the left or right half. Only the rotary positions tell, so the accuracy measures how readable
the column is at a given rotary base. Usage (one CPU thread, about two minutes per run):

    OMP_NUM_THREADS=1 python benchmarks/demo_qwen_rope_probe.py --theta 10
    OMP_NUM_THREADS=1 python benchmarks/demo_qwen_rope_probe.py --theta 10000
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn
from transformers import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

PREFIX, GRID, SUFFIX, WIDTH = 3, 6, 5, 64


def positions() -> Tensor:
    """`[3, L]` M-RoPE positions as `get_rope_index` lays out text, one 6x6 image, text."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    image = torch.stack([torch.full((GRID * GRID,), PREFIX), PREFIX + rows.flatten(), PREFIX + cols.flatten()])
    before = torch.arange(PREFIX).expand(3, -1)
    after = (PREFIX + GRID + torch.arange(SUFFIX)).expand(3, -1)
    return torch.cat([before, image, after], dim=1)


def batch(size: int, marker: Tensor, text: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`[size, L, WIDTH]` embeddings (noise image, one marked cell) and `[size]` labels (1 = right half)."""
    image = torch.randn(size, GRID * GRID, WIDTH, generator=gen)
    cell = torch.randint(GRID * GRID, (size,), generator=gen)
    image[torch.arange(size), cell] += 3 * marker
    x = torch.cat([text[:PREFIX].expand(size, -1, -1), image, text[PREFIX:].expand(size, -1, -1)], dim=1)
    return x, (cell % GRID >= GRID // 2).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theta", type=float, required=True, help="rotary base")
    parser.add_argument("--sections", default="2,3,3", help="M-RoPE sections of the 8 frequencies (time,row,column)")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Qwen2VLTextConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": args.theta,
            "mrope_section": [int(s) for s in args.sections.split(",")],
        },
    )
    model, head = Qwen2VLTextModel(config), nn.Linear(WIDTH, 2)
    marker, text = nn.Parameter(torch.randn(WIDTH)), nn.Parameter(torch.randn(PREFIX + SUFFIX, WIDTH))
    params = [*model.parameters(), *head.parameters(), marker, text]
    opt = torch.optim.AdamW(params, lr=3e-3)
    pos = positions()[:, None]
    train, held_out = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def logits(x: Tensor) -> Tensor:
        hidden = model(inputs_embeds=x, position_ids=pos.expand(-1, len(x), -1), use_cache=False).last_hidden_state
        return head(hidden[:, -1])

    for step in range(args.steps + 1):
        x, y = batch(64, marker, text, train)
        loss = nn.functional.cross_entropy(logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                x, y = batch(512, marker, text, held_out)
                accuracy = (logits(x).argmax(-1) == y).float().mean().item()
            setting = f"theta={args.theta:g} sections={args.sections}"
            print(f"{setting} step={step} loss={loss.item():.3f} left/right={accuracy:.3f}")


if __name__ == "__main__":
    main()
