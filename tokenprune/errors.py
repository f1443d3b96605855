"""Exception types raised by tokenprune.

Every user-facing error derives from :class:`TokenpruneError`; the CLI prints its message as one line
and exits non-zero. Messages say what was wrong and what is allowed. (They deliberately do not derive
from `ValueError`, so pydantic passes them through validators unchanged.)
"""


class TokenpruneError(Exception):
    """Base class of every error tokenprune raises on purpose."""


class SpecError(TokenpruneError):
    """An invalid pipeline spec string or config: malformed, or naming an unknown strategy, bad
    parameters, a budget or a place that is not allowed (the subclasses below say which)."""


class UnknownStrategyError(SpecError, KeyError):
    """A strategy name that no built-in or plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RegistryError(TokenpruneError):
    """A registration conflict, such as one name registered by two sources."""


class StrategyConfigError(SpecError):
    """Parameters that a strategy's pydantic model rejects."""


class BudgetError(SpecError):
    """A budget outside what the stage allows."""


class PlaceError(SpecError):
    """A stage placed where its scorer, or the model's adapter, cannot run it."""


class ScoreError(TokenpruneError):
    """Scores a selector cannot use, such as NaN."""


class UnsupportedModelError(TokenpruneError):
    """A model class that no registered adapter supports."""


class SignalError(TokenpruneError):
    """A signal a scorer asked for that the model cannot provide (e.g. [CLS] attention without [CLS])."""


class InputError(TokenpruneError):
    """Model inputs that tokenprune cannot compress consistently."""
