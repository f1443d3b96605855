"""Check the lmms-eval model against the real lmms-eval package (a device-tool run, where
torchvision imports): lmms-eval's registry resolves `tokenprune` through the entry point, real
`Instance` requests go through it, and its answers equal `tp.apply` + `generate` on the same inputs.

Usage: python3 scripts/lmms_eval_check.py OUT.json [DEVICE]
"""

import json
import sys
from importlib.metadata import version

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model

import tokenprune as tp
from tokenprune.evaluation import demo_samples
from tokenprune.models import build_prompt

out_path, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cuda")
samples = demo_samples(64)
docs = {"demo": {"eval": {i: {"image": s.image} for i, s in enumerate(samples)}}}
settings = {"until": ["</s>"], "max_new_tokens": 3}


def requests(kind: str) -> list[Instance]:
    made = []
    for i, s in enumerate(samples):
        second = dict(settings) if kind == "generate_until" else s.answer
        made.append(
            Instance(
                request_type=kind,
                arguments=(s.question, second, lambda doc: [doc["image"]], i, "demo", "eval"),
                idx=0,
                metadata={"task": "demo", "doc_id": i, "repeats": 1},
            )
        )
    return made


report = {"lmms_eval": version("lmms_eval"), "torch": torch.__version__, "transformers": version("transformers")}
cls = get_model("tokenprune")
for spec in (None, "vtc-cls@36", "vtc-cls-ensemble@36", "fastv@0.25"):
    args = "pretrained=demo" + (f",pipeline={spec}" if spec else "")
    lmm = cls.create_from_arg_string(args, {"batch_size": 16, "device": device, "max_batch_size": None})
    lmm.task_dict = docs
    answers = lmm.generate_until(requests("generate_until"))
    direct = []
    for s in samples:
        inputs = lmm.processor(images=[s.image], text=build_prompt(lmm.processor, s.question), return_tensors="pt").to(
            device
        )
        with torch.inference_mode(), tp.apply(lmm.model, spec) if spec else torch.no_grad():
            ids = lmm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        direct.append(lmm.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    likelihoods = lmm.loglikelihood(requests("loglikelihood")[:16])
    report[spec or "unpruned"] = {
        "is_lmms_subclass": isinstance(lmm, lmms),
        "accuracy": sum(a.strip() == s.answer for a, s in zip(answers, samples, strict=False)) / len(samples),
        "equal_to_direct_generate": answers == direct,
        "mismatches": [(i, a, d) for i, (a, d) in enumerate(zip(answers, direct, strict=False)) if a != d][:5],
        "answer_is_greedy": sum(g for _, g in likelihoods) / len(likelihoods),
        "mean_loglikelihood": sum(lp for lp, _ in likelihoods) / len(likelihoods),
        "traces": len(lmm.traces),
    }
    print(spec or "unpruned", report[spec or "unpruned"])
with open(out_path, "w") as handle:
    json.dump(report, handle, indent=2)
