"""`tokenprune compare`'s default strategy list: named variants, fixed-budget forms of adaptive
strategies, and VTW at half the LLM's depth."""

import tokenprune as tp
from tokenprune.cli.compare_cmd import default_strategies


def test_default_list_runs_in_batches(tiny):
    names = default_strategies(tiny.model)
    assert {"fopru", "fopru(variant='row')", "vtw@0@llm:1"} <= set(names)  # the tiny LLM has 3 layers
    assert "prumerge+prumerge-merge(adaptive=False)" in names and "prumerge" not in names
    assert "prumerge-plus+prumerge-plus-merge(adaptive=False)" in names
    for name in names:  # every entry parses, with a budget where it carries none
        pipeline = tp.Pipeline.from_spec(name if "@" in name else f"{name}@0.5")
        assert all(stage.selector.keeps_exactly_k() for stage in pipeline.stages)
