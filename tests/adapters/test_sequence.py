"""Prompt compaction against a loop reference: kept columns in order, shorter rows left-padded."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune.adapters.sequence import compact


def compaction_by_hand(keep: list[list[bool]]) -> tuple[list[list[int]], list[list[bool]], list[list[int]]]:
    """Per row: the source column of each new column (0 at padding), validity, and how many
    columns were removed before each original column."""
    kept = [[c for c, k in enumerate(row) if k] for row in keep]
    width = max(map(len, kept))
    source = [[0] * (width - len(cols)) + cols for cols in kept]
    valid = [[False] * (width - len(cols)) + [True] * len(cols) for cols in kept]
    removed_before = []
    for row in keep:
        counts, removed = [], 0
        for k in row:
            counts.append(removed)
            removed += not k
        removed_before.append(counts)
    return source, valid, removed_before


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4)
    .flatmap(lambda p: st.lists(st.lists(st.booleans(), min_size=p, max_size=p), min_size=1, max_size=4))
    .filter(lambda rows: all(any(r) for r in rows))
)
def test_compact_matches_loop_reference(rows):
    keep = torch.tensor(rows)
    source, valid, removed_before = compaction_by_hand(rows)
    lengths = (max(sum(r) for r in rows), min(sum(r) for r in rows))
    for comp in (compact(keep), compact(keep, lengths)):
        assert comp.source.tolist() == source
        assert comp.valid.tolist() == valid
        assert comp.removed_before.tolist() == removed_before
        assert comp.removed.tolist() == [len(r) - sum(r) for r in rows]
        assert comp.padded == (lengths[1] < lengths[0])
        mask = comp.attention_mask(None)
        assert (mask is None) if not comp.padded else mask.tolist() == [[int(v) for v in row] for row in valid]
