"""lmms-eval model `tokenprune` (install `tokenprune[eval]`): any supported model, any pipeline.

```bash
python -m lmms_eval --model tokenprune \
    --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline=vtc-cls@64,dtype=bfloat16 \
    --tasks mme --batch_size 1
```

lmms-eval finds it through the `lmms_eval.models` entry point, whose `manifest()` names this class.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .harness import PrunedLMM


class TokenpruneLMMS(PrunedLMM, lmms):
    """`PrunedLMM` as an lmms-eval model (see `tokenprune.integrations.harness`)."""

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        lmms.__init__(self)
        PrunedLMM.__init__(self, **kwargs)


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point's payload: model id `tokenprune`."""
    return ModelManifest(model_id="tokenprune", simple_class_path=f"{__name__}.TokenpruneLMMS")
