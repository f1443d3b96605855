"""The shipped demo checkpoint: plain transformers loads it, and it reaches the accuracy bar."""

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.demo.scenes import sample
from tokenprune.models import build_prompt, demo_path

SLICE = 200


def test_checkpoint_is_small_and_loads_with_plain_transformers():
    size = sum(f.stat().st_size for f in demo_path().iterdir())
    assert size <= 20 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(demo_path())
    processor = AutoProcessor.from_pretrained(demo_path())
    assert model.config.vision_config.model_type == "clip_vision_model"
    tower = model.model.vision_tower
    assert getattr(tower, "vision_model", tower).embeddings.class_embedding is not None
    assert (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 >= 144
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@torch.no_grad()
def test_accuracy_bar_on_a_fixed_slice():
    model = LlavaForConditionalGeneration.from_pretrained(demo_path(), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(demo_path())
    pairs = [sample("eval", i) for i in range(SLICE)]
    inputs = processor(
        images=[Image.fromarray(s.render()) for s, _ in pairs],
        text=[build_prompt(processor, q.text) for _, q in pairs],
        return_tensors="pt",
        padding=True,
    )
    answers = [q.answer for _, q in pairs]

    def accuracy(logits):
        words = processor.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
        return sum(w == a for w, a in zip(words, answers, strict=False)) / SLICE

    full = accuracy(model(**inputs).logits)
    with tp.apply(model, "random@0.25"):
        random_quarter = accuracy(model(**inputs).logits)
    assert full >= 0.95
    assert random_quarter <= full - 0.15
