"""Budgets: how many tokens a stage keeps, as a count `k` or a ratio of the tokens reaching it."""

from __future__ import annotations

import math

from .errors import BudgetError

Budget = int | float


WITHDRAW_HINT = (
    "(budget 0, withdrawing every visual token as VTW does, is allowed inside the LLM only: e.g. uniform@0@llm:16)"
)


def check_budget(budget: object, allow_zero: bool = False) -> Budget:
    """Validate a budget's form: an int `k >= 1`, or a float ratio in `(0, 1]`; with `allow_zero`,
    also the int `0` (the stage withdraws every visual token).

    Raises:
        BudgetError: for booleans, non-numbers, `k < 1` (`k < 0` with `allow_zero`), or a ratio
            outside `(0, 1]`.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise BudgetError(f"budget must be an int k >= 1 or a float ratio in (0, 1], got {budget!r}")
    if isinstance(budget, int):
        if budget < (0 if allow_zero else 1):
            raise BudgetError(
                f"budget {budget} keeps no tokens; use an int k >= 1 or a float ratio in (0, 1] {WITHDRAW_HINT}"
            )
        return budget
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget ratio {budget!r} is outside (0, 1]; use a ratio such as 0.25, or an int k >= 1")
    return budget


def resolve_budget(budget: Budget, n: int, where: object = "stage") -> int:
    """The number of tokens to keep out of `n`; `where` names the stage in the error (formatted
    only when one is raised, so a stage can pass itself).

    A ratio keeps `round(ratio * n)` tokens (halves rounded up), at least 1; the int 0 keeps none.

    Raises:
        BudgetError: an int `k` larger than `n`.
    """
    check_budget(budget, allow_zero=True)
    if isinstance(budget, int):
        if budget > n:
            raise BudgetError(
                f"budget {budget} exceeds the {n} tokens that reach {where}; use an int k <= {n} or a ratio in (0, 1]"
            )
        return budget
    return max(1, min(n, math.floor(budget * n + 0.5)))


def format_budget(budget: Budget) -> str:
    """The spec form of a budget: `64` or `0.25` (a ratio always shows its decimal point)."""
    return str(budget) if isinstance(budget, int) else repr(float(budget))
