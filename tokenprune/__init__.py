"""tokenprune: training-free visual-token compression for multimodal LLMs.

```python
import tokenprune as tp
with tp.apply(model, "vtc-cls@64") as run:
    out = model.generate(**inputs, max_new_tokens=16)
run.trace
```
"""

from .apply import Run, apply
from .budget import BudgetRule, IqrRule, MassRule
from .errors import TokenpruneError
from .pipeline import Pipeline, Stage
from .reduction import Reduction
from .registry import create, list_adapters, list_strategies, register, register_adapter
from .signals import ClsAttention, Signal, TextAttention
from .strategy import ModelInfo, ScoringContext, ScoringStrategy, Selector

__version__ = "0.1.0"

__all__ = [
    "BudgetRule",
    "ClsAttention",
    "IqrRule",
    "MassRule",
    "ModelInfo",
    "Pipeline",
    "Reduction",
    "Run",
    "ScoringContext",
    "ScoringStrategy",
    "Selector",
    "Signal",
    "Stage",
    "TextAttention",
    "TokenpruneError",
    "__version__",
    "apply",
    "create",
    "list_adapters",
    "list_strategies",
    "register",
    "register_adapter",
]
