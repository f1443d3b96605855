"""Train the second demo MLLM, a tiny Qwen2-VL without [CLS], from a seed.

`python -m tokenprune.demo.train_qwen --out DIR [--device cuda]`

The scenes and questions are the LLaVA demo's (`tokenprune.demo.train`): 96x96 images cut into the same
144 patches of 8 px, which Qwen's 2x2 patch merger fuses into 36 LLM tokens (Qwen's own 4:1 ratio).

Stage 1 pre-trains a Qwen2-VL vision tower (2D RoPE, no [CLS], no absolute position embedding) of
`--pretrain-depth` blocks: a multi-label head on the mean of its output tokens predicts which (shape,
colour) pairs the scene holds and which of them are large (`scenes.content_labels`). Every token's
output enters the loss, so each token learns to describe what it covers; nothing asks one token to
summarise the image, as a [CLS] objective does. Stage 2 keeps the tower's first
`--vision-depth` blocks, frozen (early features stay local, so which tokens are kept matters, as in
the LLaVA demo), and trains the patch merger and a small Qwen2 LLM with M-RoPE from scratch on the
answers. Where things are reaches the LLM as Qwen2-VL passes it, through each merged token's M-RoPE
row and column; `ROPE_THETA` and `MROPE_SECTION` are scaled to the demo's short prompts so that a
6x6 grid spans a usable range of rotary phase (Qwen2-VL's own theta of 1e6 turns 6 columns by less
than a thousandth of a radian).

The checkpoint is saved in bfloat16, then reloaded with `tokenprune.models.load` (as `--model DIR`
loads it) and scored on the evaluation split, unpruned and with `random@0.25`. Stage 2's step count
shrinks to fit `--time-budget` when the measured step time says it would not (the steps run are in
`training.json`; `--qa-steps N` reproduces them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor, nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids

from ..models import build_prompt
from ..versions import environment
from .data import normalise, render_split
from .scenes import COLOURS, KINDS, SHAPES, content_labels, make_question, sample, vocabulary
from .tokenizer import qwen_processor
from .train import encode_questions, schedule

IMAGE, PATCH, MERGE, TEMPORAL = 96, 8, 2, 2
GRID = IMAGE // PATCH  # 12 x 12 patches
N_TOKENS = (GRID // MERGE) ** 2  # 36 merged tokens reach the LLM
IMAGE_TOKEN = "<|image_pad|>"
ROPE_THETA = 10.0  # the LLM's rotary base: 6 columns span up to 1.4 rad of phase, 6 rows 3.7 rad
MROPE_SECTION = [4, 14, 14]  # rotary frequencies for (time, row, column): one frame needs few for time


def vision_config(depth: int) -> Qwen2VLVisionConfig:
    """Qwen's ViT at the LLaVA demo's width: 192 wide, 6 heads, 8-px patches, 2x2 merge into the LLM's 256."""
    return Qwen2VLVisionConfig(
        depth=depth,
        embed_dim=192,
        hidden_size=256,
        num_heads=6,
        mlp_ratio=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )


def qwen_config(vocab_size: int, token_ids: dict[str, int], vision_depth: int) -> Qwen2VLConfig:
    """The demo's Qwen2-VL: the tower above and a 4-layer Qwen2 LLM (width 256, 4 heads, 2 KV heads, M-RoPE)."""
    text = Qwen2VLTextConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=token_ids["<pad>"],
        bos_token_id=None,
        eos_token_id=token_ids["<|im_end|>"],
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": MROPE_SECTION},
    )
    return Qwen2VLConfig(
        vision_config=vision_config(vision_depth).to_dict(),
        text_config=text.to_dict(),
        image_token_id=token_ids[IMAGE_TOKEN],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def patchify(images: Tensor) -> Tensor:
    """`[B, H, W, 3]` uint8 -> `[B, N, 3 * 2 * P * P]` float: Qwen2-VL's processor layout (normalised,
    each frame repeated over the temporal patch, patches grouped by 2x2 merge unit, units row-major)."""
    x = normalise(images)
    x = rearrange(x, "b c (gh mh ph) (gw mw pw) -> b (gh gw mh mw) c ph pw", mh=MERGE, mw=MERGE, ph=PATCH, pw=PATCH)
    return rearrange(repeat(x, "b n c ph pw -> b n c t ph pw", t=TEMPORAL), "b n c t ph pw -> b n (c t ph pw)")


def tower_forward(tower: Qwen2VisionTransformerPretrainedModel, pixels: Tensor) -> Tensor:
    """The tower's blocks on a batch of equal-size images at once: `[B, N, C*T*P*P]` -> `[B, N, D]`.

    Computes what `tower(pixels.flatten(0, 1), grid_thw)` computes before the merger (each image attends
    only to itself), with one batched attention per block instead of one call per image.
    """
    batch, n = pixels.shape[:2]
    grid = int(round(n**0.5))
    x = tower.patch_embed(pixels.flatten(0, 1)).view(batch, n, -1)
    positions = get_vision_position_ids(torch.tensor([[1, grid, grid]], device=x.device), tower.spatial_merge_size)
    cos, sin = tower.rotary_pos_emb(x, positions)
    block: Any
    for block in tower.blocks:
        attn = block.attn
        q, k, v = rearrange(attn.qkv(block.norm1(x)), "b n (three h d) -> three b n h d", three=3, h=attn.num_heads)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.to(q.dtype).transpose(1, 2)
        )
        x = x + attn.proj(rearrange(out, "b h n d -> b n (h d)"))
        x = x + block.mlp(block.norm2(x))
    return x


def autocast(device: str) -> Any:
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu")


def pretrain_vision(
    images: Tensor, labels: Tensor, depth: int, steps: int, batch: int, lr: float, device: str, log: Callable
) -> Qwen2VisionTransformerPretrainedModel:
    """Stage 1: tower + multi-label head on the mean of its output tokens (no [CLS])."""
    torch.manual_seed(1)
    tower = Qwen2VisionTransformerPretrainedModel(vision_config(depth)).to(device)  # type: ignore[arg-type]  # transformers wraps .to
    norm = nn.LayerNorm(tower.config.embed_dim).to(device)
    head = nn.Linear(tower.config.embed_dim, labels.shape[1]).to(device)
    params = [p for module in (tower, norm, head) for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    gen = torch.Generator(device="cpu").manual_seed(1)
    started = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        with autocast(device):
            logits = head(norm(tower_forward(tower, patchify(images[idx.to(images.device)].to(device)))).mean(1))
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(
                {
                    "stage": "vision",
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "seconds": round(time.time() - started),
                }
            )
    return tower.eval()


@torch.no_grad()
def frozen_features(tower: Qwen2VisionTransformerPretrainedModel, images: Tensor, device: str) -> Tensor:
    """`[S, N, D]` bf16 output of the frozen tower's blocks (the merger's input), for every scene."""
    out = []
    for start in range(0, len(images), 1024):
        with autocast(device):
            out.append(tower_forward(tower, patchify(images[start : start + 1024].to(device))).to(torch.bfloat16))
    return torch.cat(out)


def keep_tower_blocks(model: Qwen2VLForConditionalGeneration, tower: Qwen2VisionTransformerPretrainedModel) -> None:
    """Copy the pre-trained tower's patch embedding and first blocks into `model`'s (its merger stays new)."""
    depth = len(model.model.visual.blocks)
    state = {
        k: v
        for k, v in tower.state_dict().items()
        if not k.startswith("merger.") and (not k.startswith("blocks.") or int(k.split(".")[1]) < depth)
    }
    missing, unexpected = model.model.visual.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("merger.") for k in missing):
        raise RuntimeError(f"tower weights do not fit the model: missing {missing}, unexpected {unexpected}")


def fit_steps(step: int, planned: int, seconds_per_step: float, seconds_left: float) -> int:
    """The total step count that ends within `seconds_left` after `step`, at most `planned`."""
    return max(step + 1, min(planned, step + int(seconds_left / seconds_per_step)))


def prompt_positions(model: Qwen2VLForConditionalGeneration, ids: Tensor) -> Tensor:
    """`[3, 1, L]` M-RoPE positions of the prompt row `ids` `[1, L]` (one image, `get_rope_index`)."""
    row = ids.cpu()
    grid = torch.tensor([[1, GRID, GRID]])
    return model.model.get_rope_index(row, (row == model.config.image_token_id).int(), image_grid_thw=grid)[0]


def qa_logits(model: Qwen2VLForConditionalGeneration, ids: Tensor, features: Tensor, positions: Tensor) -> Tensor:
    """Qwen2-VL's forward on precomputed tower outputs: `[B, L]` ids, `[B, N, D]` features (before the
    merger), `[3, 1, L]` positions shared by the rows -> `[B, L, V]` logits, no attention mask."""
    core = model.model
    merger = core.visual.merger
    x = core.get_input_embeddings()(ids)
    units = merger(features.to(merger.ln_q.weight.dtype))
    x = x.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), units.to(x.dtype))
    positions = positions.expand(-1, len(ids), -1)
    return model.lm_head(core.language_model(inputs_embeds=x, position_ids=positions, use_cache=False)[0])


def train_qa(
    model: Qwen2VLForConditionalGeneration,
    processor: Any,
    images: Tensor,
    questions: list[Any],
    steps: int,
    batch: int,
    lr: float,
    device: str,
    log: Callable,
    deadline: float | None,
) -> int:
    """Stage 2: frozen tower (features computed once); merger and LLM trained on the answers.

    The forward is Qwen2-VL's own on precomputed tower outputs: the merger's tokens replace the
    `<|image_pad|>` embeddings, the LLM gets the prompt's M-RoPE positions (`get_rope_index`; the image
    comes before the question, so every row shares them) and no attention mask (rows are right-padded,
    and causal attention never lets a real token see the padding after it). Returns the steps run.
    """
    core = model.model
    core.visual.patch_embed.requires_grad_(False)
    core.visual.blocks.requires_grad_(False)
    features = frozen_features(core.visual, images, device)
    ids, _, labels = (t.to(device) for t in encode_questions(processor, questions, IMAGE_TOKEN, N_TOKENS))
    positions = prompt_positions(model, ids[:1]).to(device)
    scene_of = (torch.arange(len(questions)) // (len(questions) // len(images))).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.startswith("cuda"))
    plan = {"total": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, plan["total"]))
    gen = torch.Generator(device=device).manual_seed(3)
    model.train()
    started = time.time()
    probe = (20, 120)  # steps between which the step time is measured
    step = 0
    while step < plan["total"]:
        idx = torch.randint(len(questions), (batch,), generator=gen, device=device)
        with autocast(device):
            logits = qa_logits(model, ids[idx], features[scene_of[idx]], positions)[:, :-1]
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[idx, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step == probe[0]:
            loss.item()  # synchronise before timing
            probe_start = time.time()
        if step == probe[1] and deadline is not None:
            loss.item()
            per_step = (time.time() - probe_start) / (probe[1] - probe[0])
            fitted = fit_steps(step, plan["total"], per_step, deadline - time.time())
            if fitted < plan["total"]:
                log({"stage": "qa", "fit_to_time_budget": {"planned": plan["total"], "steps": fitted}})
                plan["total"] = fitted
        if step % 500 == 0 or step == plan["total"] - 1:
            log({"stage": "qa", "step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - started)})
        step += 1
    model.eval()
    return plan["total"]


@torch.no_grad()
def score(model: nn.Module, processor: Any, n: int, device: str, pipeline: str | None = None) -> dict[str, float]:
    """First-token accuracy on the first `n` evaluation questions through the real processor path,
    overall and per question kind, unpruned or under `pipeline` (`tokenprune.apply`)."""
    from .. import apply

    hits: dict[str, list[bool]] = {kind: [] for kind in KINDS}
    for start in range(0, n, 250):
        pairs = [sample("eval", i) for i in range(start, min(n, start + 250))]
        inputs = processor(
            images=[Image.fromarray(s.render()) for s, _ in pairs],
            text=[build_prompt(processor, q.text) for _, q in pairs],
            return_tensors="pt",
            padding=True,
        ).to(device)
        if pipeline is None:
            logits = model(**inputs).logits[:, -1]
        else:
            with apply(model, pipeline):
                logits = model(**inputs).logits[:, -1]
        words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for word, (_, q) in zip(words, pairs, strict=True):
            hits[q.kind].append(word == q.answer)
    out = {"all": sum(map(sum, hits.values())) / n}
    return out | {kind: sum(h) / len(h) for kind, h in hits.items() if h}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenes", type=int, default=60_000)
    parser.add_argument("--questions-per-scene", type=int, default=4)
    parser.add_argument("--pretrain-depth", type=int, default=6, help="tower blocks in stage 1")
    parser.add_argument("--vision-depth", type=int, default=3, help="blocks kept in the model (the LLM reads the last)")
    parser.add_argument("--vision-steps", type=int, default=2000)
    parser.add_argument("--qa-steps", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256, help="questions per stage-2 step")
    parser.add_argument("--vision-batch", type=int, default=256, help="images per stage-1 step")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation questions scored at the end")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes rendering scenes")
    parser.add_argument("--time-budget", type=float, default=400.0, help="seconds for the whole run (fits stage 2)")
    parser.add_argument("--quick", action="store_true", help="a tiny run to try the pipeline end to end")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.vision_steps, args.qa_steps, args.batch, args.vision_batch, args.eval = 64, 4, 6, 16, 16, 16
    if not 1 <= args.vision_depth <= args.pretrain_depth:
        parser.error(f"--vision-depth must be between 1 and --pretrain-depth ({args.pretrain_depth})")

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "training.log").open("w")
    history: list[dict[str, Any]] = []

    def log(entry: dict[str, Any]) -> None:
        history.append(entry)
        print(entry, flush=True)
        print(entry, file=log_file, flush=True)

    torch.manual_seed(0)
    processor = qwen_processor(vocabulary(), IMAGE, PATCH, MERGE)
    images, scenes, _ = render_split("train", args.scenes, args.workers)
    rng = np.random.default_rng(7)  # questions_per_scene fresh questions per training scene
    questions = [make_question(s, rng) for s in scenes for _ in range(args.questions_per_scene)]
    rendered = time.time()
    images_t = torch.from_numpy(images).to(args.device)
    labels = torch.from_numpy(np.stack([content_labels(s) for s in scenes]))
    tower = pretrain_vision(
        images_t, labels, args.pretrain_depth, args.vision_steps, args.vision_batch, 1e-3, args.device, log
    )
    vision_done = time.time()

    tok = processor.tokenizer
    torch.manual_seed(2)
    config = qwen_config(len(tok), tok.get_vocab(), args.vision_depth)
    model = Qwen2VLForConditionalGeneration(config).to(args.device)
    keep_tower_blocks(model, tower)
    deadline = started + args.time_budget - 45  # left for saving, reloading and scoring
    qa_steps = train_qa(
        model, processor, images_t, questions, args.qa_steps, args.batch, 1e-3, args.device, log, deadline
    )
    trained = time.time()

    model.to(torch.bfloat16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    seconds = {
        "render": round(rendered - started, 1),
        "vision": round(vision_done - rendered, 1),
        "qa": round(trained - vision_done, 1),
    }
    info = {
        "seconds": seconds,
        "steps": {"vision": args.vision_steps, "qa": qa_steps, "qa_planned": args.qa_steps},
        "seeds": {"torch": [0, 1, 2, 3], "questions": 7, "scenes": "tokenprune.demo.scenes.SPLIT_SEEDS"},
        "args": {k: str(v) for k, v in vars(args).items()},
        **environment(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "log": history,
        "classes": [f"{which}{c} {s}" for which in ("", "large: ") for s in SHAPES for c in COLOURS],
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2))  # kept should the scoring fail

    from ..models import load

    reloaded, reloaded_processor = load(str(args.out), device=args.device, dtype="float32")
    info["eval_questions"] = args.eval
    info["eval_accuracy"] = score(reloaded, reloaded_processor, args.eval, args.device)
    log({"eval_accuracy": info["eval_accuracy"]})
    torch.manual_seed(0)
    random_quarter = score(reloaded, reloaded_processor, args.eval, args.device, "random@0.25")
    info["eval_accuracy_random@0.25"] = random_quarter["all"]
    log({"eval_accuracy_random@0.25": info["eval_accuracy_random@0.25"]})
    seconds["total"] = round(time.time() - started, 1)
    log({"seconds": seconds, "steps": info["steps"]})
    log_file.close()
    (args.out / "training.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
