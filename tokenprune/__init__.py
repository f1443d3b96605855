"""tokenprune: training-free visual-token compression for multimodal LLMs.

```python
import tokenprune as tp
with tp.apply(model, "vtc-cls@64") as run:
    out = model.generate(**inputs, max_new_tokens=16)
run.trace
```
"""

from importlib.metadata import PackageNotFoundError, version

from .adapters.providers import register_provider
from .apply import Run, apply, check
from .budget import BudgetRule, IqrRule, MassRule
from .errors import TokenpruneError
from .pipeline import Pipeline, Stage
from .reduction import Reduction
from .registry import create, list_adapters, list_strategies, register, register_adapter
from .signals import ClsAttention, Signal, TextAttention, register_signal, signal_types
from .strategy import ModelInfo, ScoringContext, ScoringStrategy, SelectContext, Selector

try:
    __version__ = version("tokenprune")  # the one source: pyproject.toml, through the installed metadata
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

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
    "SelectContext",
    "Selector",
    "Signal",
    "Stage",
    "TextAttention",
    "TokenpruneError",
    "__version__",
    "apply",
    "check",
    "create",
    "list_adapters",
    "list_strategies",
    "register",
    "register_adapter",
    "register_provider",
    "register_signal",
    "signal_types",
]
