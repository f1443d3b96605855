"""Places where a stage can run: inside the vision encoder, before the projector, inside the LLM."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlaceError
from .spec import shorten

_PLACE = re.compile(r"^(?:(projector)|(vision|llm):(\d{1,9}))$")
_ORDER = {"vision": 0, "projector": 1, "llm": 2}


@dataclass(frozen=True, order=True)
class Place:
    """A parsed place: `kind` is `"vision"`, `"projector"` or `"llm"`; `layer` is set for the first
    and last (the stage runs after that many blocks/decoder layers)."""

    rank: int
    layer: int
    kind: str

    @classmethod
    def parse(cls, text: str) -> Place:
        """Parse `"projector"`, `"llm:K"` or `"vision:L"`.

        Raises:
            PlaceError: any other string.
        """
        m = _PLACE.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise PlaceError(
                f"unknown place {shorten(text)}; allowed: 'projector' (before the LLM), "
                "'llm:K' (inside the LLM after decoder layer K), 'vision:L' (inside the vision "
                "encoder after block L)"
            )
        if m.group(1):
            return cls(rank=_ORDER["projector"], layer=0, kind="projector")
        kind, layer = m.group(2), int(m.group(3))
        return cls(rank=_ORDER[kind], layer=layer, kind=kind)

    def __str__(self) -> str:
        return self.kind if self.kind == "projector" else f"{self.kind}:{self.layer}"
