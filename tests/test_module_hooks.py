"""Hooks act on the module (documented in `tp.apply` and docs/reliability.md): another thread's
plain call inside the context is compressed too; a deep copy inside it is refused."""

import copy
import threading

import pytest
import torch
from conftest import N_PATCHES, images

import tokenprune as tp
from tokenprune.errors import InputError


def test_another_threads_call_inside_the_context_is_compressed(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=8))
    with torch.no_grad():
        full = tiny.model(**inputs).logits.shape[1]
    lengths = []

    def plain_call():
        with torch.no_grad():
            lengths.append(tiny.model(**inputs).logits.shape[1])

    with tp.apply(tiny.model, "vtc-cls@4") as run:
        thread = threading.Thread(target=plain_call)
        thread.start()
        thread.join()
    assert lengths == [full - (N_PATCHES - 4)] and len(run.trace) == 1
    plain_call()
    assert lengths[-1] == full


def test_deepcopy_inside_the_context_is_refused_and_fine_outside(tiny):
    inputs = tiny.inputs(["what colour is the square"], images(1, seed=8))
    with tp.apply(tiny.model, "vtc-cls@4"):
        with pytest.raises(InputError, match="cannot deep-copy a LlavaForConditionalGeneration while tokenprune"):
            copy.deepcopy(tiny.model)
    clone = copy.deepcopy(tiny.model)
    with torch.no_grad():
        assert torch.equal(clone(**inputs).logits, tiny.model(**inputs).logits)
