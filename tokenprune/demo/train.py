"""Train the demo MLLM from a seed.

`python -m tokenprune.demo.train --out DIR [--device cuda]`

Stage 1 pre-trains a small CLIP-style ViT (with [CLS]) on a [CLS] objective: a multi-label head on
the pooled [CLS] predicts which (shape, colour) pairs the scene holds and in which half, so [CLS]
attention carries the meaning VTC-CLS relies on. Stage 2 freezes the ViT and trains the projector and a small Llama
from scratch on single-word visual questions, reading the ViT's block-1 output
(`vision_feature_layer=2`): early features stay local, so which tokens are kept matters.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..models import build_prompt
from .data import normalise, render_split
from .scenes import COLOURS, SHAPES, make_question, presence_labels, sample, vocabulary
from .tokenizer import llava_processor

IMAGE, PATCH = 96, 8
N_TOKENS = (IMAGE // PATCH) ** 2


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=192,
    )


def llava_config(vocab_size: int, image_token_id: int, feature_layer: int) -> LlavaConfig:
    text = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def schedule(step: int, total: int, warmup: int = 200) -> float:
    """Linear warm-up then cosine decay, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    device: str,
    log: list[dict[str, Any]],
) -> CLIPVisionModel:
    """Stage 1: ViT + multi-label head on the pooled [CLS]."""
    vit = CLIPVisionModel(vision_config()).to(device)  # type: ignore[arg-type]  # HF: @wraps hides `to`'s self
    head = nn.Linear(vit.config.hidden_size, labels.shape[1]).to(device)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    gen = torch.Generator(device="cpu").manual_seed(1)
    started = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen).to(images.device)
        x = normalise(images[idx].to(device))
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = head(vit(pixel_values=x).pooler_output)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels[idx.cpu()].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log.append(
                {
                    "stage": "vision",
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "seconds": round(time.time() - started, 1),
                }
            )
            print(log[-1], flush=True)
    return vit.eval()


def encode_questions(
    processor: Any, questions: list[Any], image_token: str = "<image>", n_tokens: int = N_TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `[M, L]` ids (the prompt's `image_token` expanded to `n_tokens`), attention mask,
    labels (answer + eos)."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(image_token)
    rows, label_rows = [], []
    prompts = {}
    for q in questions:
        if q.text not in prompts:
            ids = tok(build_prompt(processor, q.text), add_special_tokens=False).input_ids
            at = ids.index(image_id)
            prompts[q.text] = ids[:at] + [image_id] * n_tokens + ids[at + 1 :]
        prompt = prompts[q.text]
        answer = [tok.convert_tokens_to_ids(q.answer), tok.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows, strict=False)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


@torch.no_grad()
def frozen_features(vit: CLIPVisionModel, images: torch.Tensor, layer: int, device: str) -> torch.Tensor:
    """`[S, N, D]` bf16 patch features of the frozen ViT at `hidden_states[layer]`, [CLS] dropped."""
    out = []
    for start in range(0, len(images), 1024):
        x = normalise(images[start : start + 1024].to(device))
        hidden = vit(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[:, 1:].to(torch.bfloat16))
    return torch.cat(out)


def train_llava(
    vit: CLIPVisionModel,
    processor: Any,
    images: torch.Tensor,
    questions: list[Any],
    feature_layer: int,
    steps: int,
    batch: int,
    lr: float,
    device: str,
    log: list[dict[str, Any]],
    max_seconds: float,
) -> LlavaForConditionalGeneration:
    """Stage 2: frozen ViT (features computed once); projector and Llama trained on the answers.

    The forward is LLaVA's own (placeholder embeddings replaced by projected features), run on
    precomputed features; the loss is the cross-entropy of the answer word and the end token.
    """
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(llava_config(len(tok), image_id, feature_layer))
    model.to(device)  # type: ignore[arg-type]  # HF: @wraps hides `to`'s self
    model.model.vision_tower.load_state_dict(vit.state_dict())
    model.model.vision_tower.requires_grad_(False)
    features = frozen_features(vit, images, feature_layer, device)
    ids, mask, labels = (t.to(device) for t in encode_questions(processor, questions))
    scene_of = (torch.arange(len(questions)) // (len(questions) // len(images))).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    gen = torch.Generator(device=device).manual_seed(3)
    embed, lm = model.model.get_input_embeddings(), model.model.language_model
    model.train()
    started = time.time()
    for step in range(steps):
        idx = torch.randint(len(questions), (batch,), generator=gen, device=device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            x = embed(ids[idx])
            projected = model.model.multi_modal_projector(features[scene_of[idx]].to(x.dtype))
            x = x.masked_scatter((ids[idx] == image_id).unsqueeze(-1), projected.to(x.dtype))
            hidden = lm(inputs_embeds=x, attention_mask=mask[idx]).last_hidden_state
            logits = model.lm_head(hidden[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[idx, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        out_of_time = time.time() - started > max_seconds
        if step % 500 == 0 or step == steps - 1 or out_of_time:
            log.append(
                {"stage": "qa", "step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - started, 1)}
            )
            print(log[-1], flush=True)
        if out_of_time:
            break
    return model.eval()


@torch.no_grad()
def accuracy(model: LlavaForConditionalGeneration, processor: Any, n: int, device: str) -> float:
    """Unpruned first-token accuracy on the first `n` evaluation questions (real processor path)."""
    hits = 0
    for start in range(0, n, 250):
        pairs = [sample("eval", i) for i in range(start, min(n, start + 250))]
        texts = [build_prompt(processor, q.text) for _, q in pairs]
        inputs = processor(
            images=[Image.fromarray(s.render()) for s, _ in pairs], text=texts, return_tensors="pt", padding=True
        ).to(device)
        pred = model(**inputs).logits[:, -1].argmax(-1).tolist()
        tokens = processor.tokenizer.convert_ids_to_tokens
        hits += sum(tokens(p) == q.answer for p, (_, q) in zip(pred, pairs, strict=False))
    return hits / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenes", type=int, default=60_000)
    parser.add_argument("--questions-per-scene", type=int, default=4)
    parser.add_argument("--vision-steps", type=int, default=2500)
    parser.add_argument("--qa-steps", type=int, default=12_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--feature-layer", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--qa-seconds", type=float, default=1e9, help="stop stage 2 after this long")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    started = time.time()
    log: list[dict[str, Any]] = []
    processor = llava_processor(vocabulary(), IMAGE, PATCH)
    images, scenes, _ = render_split("train", args.scenes, args.workers)
    q_per = args.questions_per_scene
    rng = np.random.default_rng(7)  # questions_per_scene fresh questions per training scene
    questions = [make_question(s, rng) for s in scenes for _ in range(q_per)]
    rendered = time.time()
    images_t = torch.from_numpy(images).to(args.device)
    labels = torch.from_numpy(np.stack([presence_labels(s) for s in scenes]))
    vit = pretrain_vision(images_t, labels, args.vision_steps, 256, 1e-3, args.device, log)
    vision_done = time.time()
    model = train_llava(
        vit,
        processor,
        images_t,
        questions,
        args.feature_layer,
        args.qa_steps,
        args.batch,
        1e-3,
        args.device,
        log,
        args.qa_seconds,
    )
    done = time.time()
    eval_accuracy = accuracy(model.float(), processor, 1000, args.device)
    print({"eval_accuracy_1000": eval_accuracy}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)  # type: ignore[arg-type]  # HF: @wraps hides `to`'s self
    processor.save_pretrained(args.out)
    info = {
        "seconds": {
            "render": round(rendered - started, 1),
            "vision": round(vision_done - rendered, 1),
            "qa": round(done - vision_done, 1),
        },
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "eval_accuracy_1000": eval_accuracy,
        "log": log,
        "classes": [f"{where}{c} {s}" for where in ("", "right: ", "bottom: ") for s in SHAPES for c in COLOURS],
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info["seconds"]), flush=True)


if __name__ == "__main__":
    main()
