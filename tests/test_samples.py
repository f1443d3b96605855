"""`--data` files are validated line by line before any work, every error naming the line; answers
longer than one token are scored by generating and comparing normalised text."""

import json

import pytest
import torch
from conftest import images
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.cli.app import app
from tokenprune.errors import InputError
from tokenprune.models import build_prompt, load
from tokenprune.samples import EXACT_MATCH, FIRST_TOKEN, Sample, answer_metric, jsonl_samples, normalise


@pytest.fixture
def folder(tmp_path):
    for i, img in enumerate(images(2)):
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def line(**fields) -> str:
    return json.dumps({"image": "0.png", "question": "what colour is the circle ?"} | fields)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no samples"),
        (b"\n  \n", "holds no samples"),
        (f"{line()}\n[1, 2]\n".encode(), ":2: each line must be a JSON object"),
        (f"{line()}\n{{not json\n".encode(), ":2: not valid JSON"),
        (f"{line()}\n".encode() + b'{"image": "0.png", "question": "\xff"}\n', ":2: not UTF-8"),
        (b'{"question": "q"}\n', ":1: missing 'image'"),
        (f"{line()}\n{line(question=3)}\n".encode(), ":2: 'question' must be a string, got int"),
        (f"{line(answer='')}\n".encode(), ":1: 'answer' is empty"),
        (f"{line(anwser='red')}\n".encode(), ":1: unknown field 'anwser' (allowed: image, question, answer, id, meta)"),
        (f"{line(id=True)}\n".encode(), ":1: 'id' must be a string or an integer, got bool"),
        (f"{line(id=1)}\n{line(id=2)}\n{line(id=1)}\n".encode(), ":3: id 1 repeats line 1"),
        (f"{line(answer='red')}\n{line()}\n".encode(), ":2: no 'answer', but line 1 has one"),
        (f"{line(image='missing.png')}\n".encode(), ":1: image 'missing.png' does not exist"),
        (f"{line()}\n\n{line(image='broken.png')}\n".encode(), ":3: image 'broken.png' cannot be opened"),
    ],
)
def test_bad_data_is_refused_with_its_line(folder, content, message):
    path = folder / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        jsonl_samples(path)
    assert message.replace("'missing.png'", repr(str(folder / "missing.png"))).replace(
        "'broken.png'", repr(str(folder / "broken.png"))
    ) in str(caught.value) or message in str(caught.value)
    assert str(path) in str(caught.value)


def test_cli_refuses_bad_data_before_loading_a_model(folder):
    path = folder / "data.jsonl"
    path.write_text(f"{line()}\n{line(question='')}\n")
    result = CliRunner().invoke(
        app, ["compare", "--model", "/no/such/model", "--data", str(path), "--out", str(folder / "o")]
    )
    assert result.exit_code == 2 and f"{path}:2: 'question' is empty" in result.stderr  # not "cannot load model"
    assert "Traceback" not in result.output


def test_limit_and_ids_and_meta_are_kept(folder):
    path = folder / "data.jsonl"
    path.write_text("\n".join([line(id="a", meta={"k": 1}), line(id=7, image="1.png"), line(id="c")]))
    samples = jsonl_samples(path, limit=2)
    assert [(s.index, s.id) for s in samples] == [(0, "a"), (1, 7)] and samples[1].image.mode == "RGB"


def test_answers_the_tokenizer_cannot_represent_are_refused():
    _, processor = load("demo")
    samples = [Sample(images(1)[0], "q", "red", index=0), Sample(images(1)[0], "q", "zebra", index=1)]
    with pytest.raises(InputError, match=r"sample 2: the tokenizer cannot represent the answer 'zebra'"):
        answer_metric(processor.tokenizer, samples)
    assert answer_metric(processor.tokenizer, samples[:1]) == FIRST_TOKEN
    two = [Sample(images(1)[0], "q", "red circle", index=0)]
    assert answer_metric(processor.tokenizer, two) == EXACT_MATCH


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The Red  circle.", "red circle"),
        ("  an apple, a pear ", "apple pear"),
        ("ＲＥＤ", "red"),
        ("Theatre", "theatre"),
    ],
)
def test_normalise(text, want):
    assert normalise(text) == want


def test_multi_token_answers_are_scored_by_generation(tmp_path):
    """Answers of two words: accuracy is the normalised greedy generation against the answer,
    recomputed here with plain `generate` (and `tp.apply` for the pruned row)."""
    from tokenprune.demo.scenes import sample

    model, processor = load("demo")
    rows, data = [], []
    for i in range(4):
        scene, q = sample("eval", i)
        image = tmp_path / f"{i}.png"
        from PIL import Image

        Image.fromarray(scene.render()).save(image)
        answer = f"{q.answer} ?" if i % 2 else f"the {q.answer} yes"  # two and three tokens
        rows.append(json.dumps({"image": image.name, "question": q.text, "answer": answer}))
        data.append((Image.open(image).convert("RGB"), q.text, answer))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    result = CliRunner().invoke(
        app,
        ["compare", "--data", str(tmp_path / "d.jsonl"), "--strategies", "vtc-cls", "--budgets", "0.25"]
        + ["--batch-size", "2", "--out", str(tmp_path / "o"), "--json"],
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["rows"]
    assert [r["metric"] for r in got] == [EXACT_MATCH] * 2

    def expected(spec):
        correct = 0
        for start in (0, 2):
            chunk = data[start : start + 2]
            inputs = processor(
                images=[c[0] for c in chunk],
                text=[build_prompt(processor, c[1]) for c in chunk],
                return_tensors="pt",
                padding=True,
            )
            with torch.inference_mode():
                if spec is None:
                    out = model.generate(**inputs, max_new_tokens=7, do_sample=False)
                else:
                    with tp.apply(model, spec):
                        out = model.generate(**inputs, max_new_tokens=7, do_sample=False)
            texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(normalise(t) == normalise(c[2]) for t, c in zip(texts, chunk, strict=True))
        return correct / 4

    assert got[0]["accuracy"] == expected(None) and got[1]["accuracy"] == expected("vtc-cls@0.25")
    assert got[0]["accuracy"] <= 0.5  # the "x ?" answers normalise to the model's one word; "the x yes" never
