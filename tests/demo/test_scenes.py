"""The demo task generator is deterministic and well-posed, and matches the processor's encoding."""

import numpy as np
import torch
from PIL import Image

from tokenprune.demo.data import normalise
from tokenprune.demo.scenes import KINDS, NUMBERS, SIZE, sample, vocabulary
from tokenprune.demo.tokenizer import llava_processor
from tokenprune.demo.train import IMAGE, N_TOKENS, PATCH, encode_questions


def test_samples_are_deterministic_and_splits_differ():
    for i in range(5):
        (s1, q1), (s2, q2) = sample("train", i), sample("train", i)
        assert s1 == s2 and q1 == q2 and np.array_equal(s1.render(), s2.render())
    assert sample("train", 0) != sample("eval", 0)


def test_questions_are_well_posed():
    kinds = set()
    for i in range(300):
        scene, q = sample("eval", i)
        kinds.add(q.kind)
        objs = scene.objects
        assert 2 <= len(objs) <= 5 and len({(o.shape, o.colour) for o in objs}) == len(objs)
        assert all(abs(o.cx - SIZE / 2) > o.r and abs(o.cy - SIZE / 2) > o.r for o in objs)
        assert q.answer in vocabulary() and all(w in vocabulary() for w in q.text.split())
        if q.kind == "count":
            assert q.answer in NUMBERS
    assert kinds == set(KINDS)


def test_training_encoding_matches_processor():
    processor = llava_processor(vocabulary(), IMAGE, PATCH)
    pairs = [sample("eval", i) for i in range(4)]
    ids, mask, labels = encode_questions(processor, [q for _, q in pairs])
    for row, (scene, q) in enumerate(pairs):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.text}]}],
            add_generation_prompt=True,
        )
        enc = processor(images=Image.fromarray(scene.render()), text=text, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert torch.equal(ids[row, :n], enc["input_ids"][0])
        assert int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == N_TOKENS
        assert labels[row, n].item() == processor.tokenizer.convert_tokens_to_ids(q.answer)
        pixels = normalise(torch.from_numpy(scene.render())[None])
        torch.testing.assert_close(enc["pixel_values"], pixels, atol=1e-6, rtol=0)
