"""The demo-qwen recipe: its processor, its training forward against Qwen2-VL's own, a tiny training run
end to end, and `tokenprune compare` on the checkpoint it writes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.utils import is_torchvision_available
from typer.testing import CliRunner

from tokenprune import models
from tokenprune.cli.app import app
from tokenprune.demo import train_qwen
from tokenprune.demo.scenes import KINDS, content_labels, sample, vocabulary
from tokenprune.demo.tokenizer import qwen_processor
from tokenprune.demo.train import encode_questions
from tokenprune.models import ModelLoadError, build_prompt, load
from tokenprune.processors import load_processor

QUESTIONS = ("what colour is the circle ?", "how many red objects are there ?")


def scenes(n: int) -> list[Image.Image]:
    return [Image.fromarray(sample("eval", i)[0].render()) for i in range(n)]


def encode(processor, images):
    prompts = [build_prompt(processor, q) for q in QUESTIONS[: len(images)]]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def processor():
    return qwen_processor(vocabulary(), train_qwen.IMAGE, train_qwen.PATCH, train_qwen.MERGE)


def test_processor_round_trips_through_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    loaded = load_processor(str(tmp_path))
    if is_torchvision_available():
        assert type(loaded).__name__ == "Qwen2VLProcessor"
    before, after = encode(processor, scenes(2)), encode(loaded, scenes(2))
    assert (
        sorted(before)
        == sorted(after)
        == sorted(["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"])
    )
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=0, atol=0)
    image_id = loaded.tokenizer.convert_tokens_to_ids(train_qwen.IMAGE_TOKEN)
    assert ((after["input_ids"] == image_id).sum(1) == train_qwen.N_TOKENS).all()
    assert torch.equal(after["mm_token_type_ids"].bool(), after["input_ids"] == image_id)
    assert after["image_grid_thw"].tolist() == [[1, 12, 12]] * 2
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.chat_template == processor.chat_template


def test_patchify_is_the_processors_layout(processor):
    images = scenes(3)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ours = train_qwen.patchify(torch.from_numpy(np.stack([np.asarray(i) for i in images])))
    torch.testing.assert_close(ours.flatten(0, 1), pixels, rtol=0, atol=1e-6)


def test_batched_tower_equals_qwen_tower(processor):
    """The training forward (one batched attention per block) computes the tower's own per-image forward."""
    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel(train_qwen.vision_config(2)).eval()
    inputs = processor.image_processor(images=scenes(3), return_tensors="pt")
    with torch.no_grad():
        reference = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
        ours = train_qwen.tower_forward(tower, inputs["pixel_values"].view(3, 144, -1))
    torch.testing.assert_close(ours.flatten(0, 1), reference, rtol=1e-5, atol=1e-5)


def test_training_rows_are_the_processors_prompts(processor):
    pairs = [sample("eval", i) for i in range(3)]
    ids, _, labels = encode_questions(processor, [q for _, q in pairs], train_qwen.IMAGE_TOKEN, train_qwen.N_TOKENS)
    for row, (scene, q) in enumerate(pairs):
        enc = processor(
            images=Image.fromarray(scene.render()), text=build_prompt(processor, q.text), return_tensors="pt"
        )
        n = enc["input_ids"].shape[1]
        assert torch.equal(ids[row, :n], enc["input_ids"][0])
        assert labels[row, n].item() == processor.tokenizer.convert_tokens_to_ids(q.answer)
        assert labels[row, n + 1].item() == processor.tokenizer.eos_token_id


def test_content_labels():
    scene, _ = sample("train", 3)
    labels = content_labels(scene)
    assert labels.shape == (60,) and labels[:30].sum() == len(scene.objects)
    assert labels[30:].sum() == sum(o.size == "large" for o in scene.objects)


def test_fit_steps():
    assert train_qwen.fit_steps(120, 10_000, 0.05, 100.0) == 2120
    assert train_qwen.fit_steps(120, 1000, 0.05, 100.0) == 1000
    assert train_qwen.fit_steps(120, 1000, 0.05, -5.0) == 121


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run of the real script, to its saved checkpoint and training.json."""
    out = tmp_path_factory.mktemp("demo-qwen")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and much faster on a shared CPU
    try:
        train_qwen.main(
            [
                *("--out", str(out), "--device", "cpu", "--scenes", "24", "--workers", "1"),
                *("--pretrain-depth", "2", "--vision-depth", "1", "--vision-steps", "3", "--vision-batch", "8"),
                *("--qa-steps", "12", "--batch", "8", "--eval", "8"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    return out


def test_training_writes_a_checkpoint_and_the_loss_falls(trained):
    info = json.loads((trained / "training.json").read_text())
    qa = [e for e in info["log"] if e.get("stage") == "qa" and "loss" in e]
    assert [e["step"] for e in qa] == [0, 11] and qa[-1]["loss"] < qa[0]["loss"] - 0.3
    assert info["steps"] == {"vision": 3, "qa": 12, "qa_planned": 12}
    assert info["versions"]["torch"] == torch.__version__ and info["eval_questions"] == 8
    assert "all" in info["eval_accuracy"] and set(info["eval_accuracy"]) - {"all"} <= set(KINDS)
    assert (trained / "training.log").read_text().count("\n") == len(info["log"])
    size = sum(f.stat().st_size for f in trained.iterdir() if f.suffix == ".safetensors")
    assert size < 20 * 2**20


def test_checkpoint_loads_with_plain_transformers(trained):
    model = AutoModelForImageTextToText.from_pretrained(trained)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert model.dtype == torch.bfloat16 and len(model.model.visual.blocks) == 1
    loaded, processor = load(str(trained))
    assert loaded.dtype == torch.float32
    assert processor.tokenizer.convert_tokens_to_ids(train_qwen.IMAGE_TOKEN) == model.config.image_token_id
    with torch.no_grad():
        logits = loaded(**encode(processor, scenes(2))).logits
    assert logits.shape[:2] == (2, encode(processor, scenes(2))["input_ids"].shape[1])


def test_compare_runs_on_the_checkpoint(trained, tmp_path):
    args = ["compare", "--model", str(trained), "--strategies", "random,pool,divprune,fastv", "--budgets", "0.25"]
    result = CliRunner().invoke(app, [*args, "--limit", "4", "--batch-size", "4", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["spec"] for r in rows] == ["", "random@0.25", "pool@0.25", "divprune@0.25", "fastv@0.25"]
    assert all(r["kept"] == 9 for r in rows[1:])  # a quarter of the 36 merged tokens
    assert all(r["flops_ratio"] < 1.0 for r in rows[1:]) and rows[0]["flops_ratio"] == 1.0


def test_missing_demo_qwen_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(models.DEMOS, models.DEMO_QWEN, "no-such-checkpoint")
    with pytest.raises(ModelLoadError, match="demo-qwen.*tokenprune.demo.train_qwen"):
        load("demo-qwen")
    result = CliRunner().invoke(app, ["compare", "--model", "demo-qwen", "--limit", "2"])
    assert result.exit_code == 2 and "tokenprune.demo.train_qwen" in result.output


def test_keep_tower_blocks_copies_the_first_blocks(processor):
    torch.manual_seed(0)
    tower = Qwen2VisionTransformerPretrainedModel(train_qwen.vision_config(3))
    tok = processor.tokenizer
    model = Qwen2VLForConditionalGeneration(train_qwen.qwen_config(len(tok), tok.get_vocab(), 2))
    merger = {k: v.clone() for k, v in model.model.visual.merger.state_dict().items()}
    train_qwen.keep_tower_blocks(model, tower)
    ours, theirs = model.model.visual.state_dict(), tower.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith("merger."))
    assert all(torch.equal(v, merger[k]) for k, v in model.model.visual.merger.state_dict().items())
    assert not any(k.startswith("blocks.2.") for k in ours)


def test_training_forward_is_the_models_forward(processor):
    """Stage 2's forward on precomputed tower outputs (shared M-RoPE rows, no mask) gives the logits
    that the model gives on the processor's inputs, so what is trained is what is evaluated."""
    torch.manual_seed(0)
    tok = processor.tokenizer
    model = Qwen2VLForConditionalGeneration(train_qwen.qwen_config(len(tok), tok.get_vocab(), 2)).eval()
    pairs = [sample("eval", i) for i in range(3)]
    ids, _, _ = encode_questions(processor, [q for _, q in pairs], train_qwen.IMAGE_TOKEN, train_qwen.N_TOKENS)
    with torch.no_grad():
        images = torch.from_numpy(np.stack([s.render() for s, _ in pairs]))
        features = train_qwen.tower_forward(model.model.visual, train_qwen.patchify(images))
        ours = train_qwen.qa_logits(model, ids, features, train_qwen.prompt_positions(model, ids[:1]))
        for row, (scene, q) in enumerate(pairs):
            enc = processor(
                images=Image.fromarray(scene.render()), text=build_prompt(processor, q.text), return_tensors="pt"
            )
            n = enc["input_ids"].shape[1]
            torch.testing.assert_close(ours[row, :n], model(**enc).logits[0], rtol=1e-4, atol=1e-4)


SHIPPED = models.demo_path(models.DEMO_QWEN)


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="demo-qwen checkpoint not shipped in this tree")
@torch.no_grad()
def test_shipped_demo_qwen_is_small_loads_and_reaches_the_bar():
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 20 * 2**20
    model, processor = load("demo-qwen")
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert not hasattr(model.config.vision_config, "image_size")  # Qwen's tower: no [CLS], no fixed grid
    pairs = [sample("eval", i) for i in range(200)]
    inputs = processor(
        images=[Image.fromarray(s.render()) for s, _ in pairs],
        text=[build_prompt(processor, q.text) for _, q in pairs],
        return_tensors="pt",
        padding=True,
    )
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(1) == train_qwen.N_TOKENS).all()
    answers = [q.answer for _, q in pairs]

    def accuracy(logits):
        words = processor.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
        return sum(w == a for w, a in zip(words, answers, strict=True)) / len(pairs)

    assert accuracy(model(**inputs).logits) >= 0.95
