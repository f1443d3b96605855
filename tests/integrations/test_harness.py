"""`PrunedLMM` driven as lmms-eval drives a model: requests whose `.args` follow lmms-eval's
`Instance` layout, documents in `task_dict`, on the bundled demo model. Each answer is checked
against the public API (`tp.apply` + `generate`) or a hand-computed log-likelihood."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import tokenprune as tp
from tokenprune.errors import InputError, PlaceError
from tokenprune.evaluation import demo_samples
from tokenprune.integrations.harness import PrunedLMM, parse_arg_string
from tokenprune.models import build_prompt

N = 6
SAMPLES = demo_samples(N)
UNTIL = {"until": ["</s>"], "max_new_tokens": 3}


@dataclass
class Request:
    """What the harness reads of an lmms-eval `Instance`."""

    args: tuple


def doc_to_visual(doc: dict[str, Any]) -> list:
    return [doc["image"]]


def with_tasks(lmm: PrunedLMM) -> PrunedLMM:
    lmm.task_dict = {"demo": {"eval": {i: {"image": s.image} for i, s in enumerate(SAMPLES)}}}
    return lmm


def generation_requests(settings: dict[str, Any] = UNTIL) -> list[Request]:
    return [Request((s.question, dict(settings), doc_to_visual, i, "demo", "eval")) for i, s in enumerate(SAMPLES)]


@pytest.fixture(scope="module")
def pruned() -> PrunedLMM:
    return with_tasks(PrunedLMM(pipeline="vtc-cls@36", device="cpu", batch_size=4))


@pytest.fixture(scope="module")
def unpruned() -> PrunedLMM:
    return with_tasks(PrunedLMM(device="cpu", batch_size=4))


def reference_answers(lmm: PrunedLMM, spec: str | None, **generation: Any) -> list[str]:
    """One sample at a time through the public API."""
    answers = []
    for s in SAMPLES:
        inputs = lmm.processor(images=[s.image], text=build_prompt(lmm.processor, s.question), return_tensors="pt")
        with torch.inference_mode():
            if spec is None:
                ids = lmm.model.generate(**inputs, max_new_tokens=3, do_sample=False, **generation)
            else:
                with tp.apply(lmm.model, spec):
                    ids = lmm.model.generate(**inputs, max_new_tokens=3, do_sample=False, **generation)
        answers.append(lmm.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def test_generate_until_matches_the_public_api_per_sample_in_batches_of_four(pruned):
    got = pruned.generate_until(generation_requests())
    assert got == reference_answers(pruned, "vtc-cls@36")
    assert len(pruned.traces) == 2 and all(f.stages[0].tokens_out == 36 for f in pruned.traces)


def test_beam_search_requests_match_the_public_api():
    lmm = with_tasks(PrunedLMM(pipeline="vtc-cls@36", device="cpu", batch_size=1))
    got = lmm.generate_until(generation_requests({**UNTIL, "num_beams": 3}))
    assert got == reference_answers(lmm, "vtc-cls@36", num_beams=3)


def test_unpruned_baseline_answers_the_demo_questions(unpruned):
    got = unpruned.generate_until(generation_requests())
    assert got == reference_answers(unpruned, None)
    assert sum(a.strip() == s.answer for a, s in zip(got, SAMPLES, strict=False)) >= N - 1
    assert unpruned.traces == []


def test_keep_all_pipeline_equals_unpruned_bit_for_bit(unpruned):
    keep_all = with_tasks(PrunedLMM(pipeline="vtc-cls@1.0", device="cpu", batch_size=4))
    assert keep_all.generate_until(generation_requests()) == unpruned.generate_until(generation_requests())
    requests = [Request((s.question, s.answer, doc_to_visual, i, "demo", "eval")) for i, s in enumerate(SAMPLES)]
    assert keep_all.loglikelihood(requests) == unpruned.loglikelihood(requests)


def test_until_cuts_the_continuation(unpruned):
    full = unpruned.generate_until(generation_requests({"max_new_tokens": 3}))
    stop = full[0].split()[0]
    cut = unpruned.generate_until(generation_requests({"max_new_tokens": 3, "until": stop}))
    assert cut[0] == full[0].split(stop, 1)[0] and cut[0] != full[0]


@pytest.mark.parametrize("spec", [None, "vtc-cls@36", "fastv@0.5"])
def test_loglikelihood_equals_a_hand_computation(spec):
    lmm = with_tasks(PrunedLMM(pipeline=spec, device="cpu"))
    sample = SAMPLES[0]
    greedy_answer = lmm.generate_until(generation_requests({"max_new_tokens": 1}))[0].strip()
    wrong = "blue" if greedy_answer != "blue" else "red"
    requests = [
        Request((sample.question, answer, doc_to_visual, 0, "demo", "eval")) for answer in (greedy_answer, wrong)
    ]
    got = lmm.loglikelihood(requests)
    for (logprob, greedy), answer in zip(got, (greedy_answer, wrong), strict=False):
        prompt = build_prompt(lmm.processor, sample.question)
        inputs = lmm.processor(images=[sample.image], text=prompt, return_tensors="pt")
        target = lmm.processor.tokenizer(answer, add_special_tokens=False).input_ids
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        with torch.inference_mode():
            if spec is None:
                logits = lmm.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            else:
                with tp.apply(lmm.model, spec):
                    logits = lmm.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
        steps = torch.log_softmax(logits[0, -len(target) - 1 : -1].float(), dim=-1)
        expected = sum(float(steps[j, t]) for j, t in enumerate(target))
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert greedy == all(int(steps[j].argmax()) == t for j, t in enumerate(target))
    assert got[0][1] and not got[1][1] and got[0][0] > got[1][0]


def test_model_args_string_as_lmms_eval_passes_it():
    assert parse_arg_string(
        "pretrained=demo,pipeline=vtc-cls-ensemble(layers=[-2,-3])@0.25,batch_size=2,"
        "max_new_tokens=8,dtype='float32',flag=true"
    ) == {
        "pretrained": "demo",
        "pipeline": "vtc-cls-ensemble(layers=[-2,-3])@0.25",
        "batch_size": 2,
        "max_new_tokens": 8,
        "dtype": "float32",
        "flag": True,
    }
    assert parse_arg_string("pipeline=vtc-cls(layer=1)@0.5 > fastv@0.5@llm:2") == {
        "pipeline": "vtc-cls(layer=1)@0.5 > fastv@0.5@llm:2"
    }
    lmm = PrunedLMM.create_from_arg_string(
        "pretrained=demo,pipeline=vtc-cls(layer=1)@0.5,batch_size=3",
        {"batch_size": 1, "device": "cpu", "max_batch_size": None},
    )
    assert lmm.pipeline == tp.Pipeline.from_spec("vtc-cls(layer=1)@0.5") and lmm.batch_size == 3
    assert lmm.rank == 0 and lmm.world_size == 1 and lmm.device == torch.device("cpu")


def test_pipeline_file(tmp_path):
    path = tmp_path / "pipe.yaml"
    tp.Pipeline.from_spec("vtc-cls-ensemble(layers=[-1,-2])@18").save(path)
    assert PrunedLMM(pipeline_file=str(path), device="cpu").pipeline == tp.Pipeline.from_file(path)


def test_bad_arguments_are_refused_clearly(pruned):
    with pytest.raises(InputError, match="unknown model argument.*conv_template.*allowed: pretrained, pipeline"):
        PrunedLMM(device="cpu", conv_template="vicuna")
    with pytest.raises(InputError, match="not both"):
        PrunedLMM(pipeline="vtc-cls@4", pipeline_file="p.yaml")
    with pytest.raises(PlaceError, match="cannot run at projector"):
        PrunedLMM(pipeline="fastv@0.5@projector", device="cpu")
    with pytest.raises(InputError, match="llm:K needs 1 <= K < 4"):  # refused by attach: the model runs tp.check
        PrunedLMM(pipeline="vtc-cls@36 > fastv@16@llm:4", device="cpu")
    video = [Request(("q", dict(UNTIL), lambda doc: ["clip.mp4"], 0, "demo", "eval"))]
    with pytest.raises(InputError, match="image tasks.*str"):
        pruned.generate_until(video)
    with pytest.raises(InputError, match="num_beams a positive integer"):
        pruned.generate_until(generation_requests({"num_beams": 0}))
    with pytest.raises(InputError, match="multi-round"):
        pruned.generate_until_multi_round([])


STAND_IN = {
    "lmms_eval/__init__.py": "",
    "lmms_eval/api/__init__.py": "",
    "lmms_eval/api/model.py": """
        import abc
        class lmms(abc.ABC):
            is_simple = True
            def __init__(self):
                self._rank, self._world_size = 0, 1
            @abc.abstractmethod
            def loglikelihood(self, requests): ...
            @abc.abstractmethod
            def generate_until(self, requests): ...
            @abc.abstractmethod
            def generate_until_multi_round(self, requests): ...
    """,
    "lmms_eval/models/__init__.py": "",
    "lmms_eval/models/registry_v2.py": """
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str | None = None
            chat_class_path: str | None = None
            aliases: tuple = ()
    """,
}


def test_lmms_eval_model_class_and_entry_point(tmp_path, monkeypatch):
    """Wiring only, against a stand-in with lmms-eval 0.7's names and abstract methods (lmms-eval
    itself needs torchvision, which cannot be installed beside the CPU torch wheel; the real
    package was exercised on the GPU machine, see docs/evaluation.md)."""
    from importlib import import_module
    from importlib.metadata import entry_points

    for name, text in STAND_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "tokenprune"]
        manifest = ep.load()()
        module, cls_name = manifest.simple_class_path.rsplit(".", 1)
        cls = getattr(import_module(module), cls_name)
        lmm = cls.create_from_arg_string("pretrained=demo,pipeline=vtc-cls@36", {"batch_size": 4, "device": "cpu"})
        assert isinstance(lmm, import_module("lmms_eval.api.model").lmms) and manifest.model_id == "tokenprune"
        assert with_tasks(lmm).generate_until(generation_requests()) == reference_answers(lmm, "vtc-cls@36")
    finally:
        for name in [m for m in sys.modules if m.startswith(("lmms_eval", "tokenprune.integrations.lmms_eval"))]:
            del sys.modules[name]
