"""M-RoPE positions on the device (`tokenprune.adapters.mrope.rope_index`) equal each Qwen model
class's own `get_rope_index` on random prompts (several images with random grids, text between,
left or right padding, batch > 1), without a host read; the adapters use them instead of it, for the
prefill and for `generate`'s prompt positions (keep-all forward and `generate` stay bit-identical)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.adapters.mrope import rope_deltas, rope_index
from tokenprune.testing import QWEN_FAMILIES, sized_images, tiny_qwen_config

IMAGE, TEXT = 5, 9  # token ids: the image placeholder, a word
MERGE = 2  # the tiny configs' spatial merge size


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def core(request):
    """The HF core model (`Qwen2VLModel`, `Qwen2_5_VLModel`, `Qwen3VLModel`) of a tiny config."""
    from transformers import AutoModel

    config = tiny_qwen_config(request.param, vocab_size=16, image_token_id=IMAGE)
    assert config.vision_config.spatial_merge_size == MERGE
    return AutoModel.from_config(config).eval()


@st.composite
def prompts(draw, adjacent: bool = False) -> list[list[int | tuple[int, int, int]]]:
    """Prompt rows as segments: a text run's length, or an image's `(t, h, w)` patch grid (`t*h*w/4`
    placeholders). Images are separated by text unless `adjacent` (then a run between two images
    may be empty); `t = 2` is rare (a pair of video frames)."""
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row: list[int | tuple[int, int, int]] = [draw(st.integers(0, 3))]
        for i in range(draw(st.integers(0, 3))):
            if i:
                row.append(draw(st.integers(0 if adjacent else 1, 3)))
            row.append((draw(st.sampled_from([1, 1, 1, 2])), 2 * draw(st.integers(1, 5)), 2 * draw(st.integers(1, 5))))
        rows.append([*row, draw(st.integers(1, 3))])
    return rows


def tokens(row: list[int | tuple[int, int, int]]) -> list[int]:
    """A row of segments as token ids."""
    out: list[int] = []
    for segment in row:
        out += [TEXT] * segment if isinstance(segment, int) else [IMAGE] * (segment[0] * segment[1] * segment[2] // 4)
    return out


def grids(rows: list[list[int | tuple[int, int, int]]]) -> torch.Tensor:
    """`[I, 3]` the images' grids in prompt order."""
    return torch.tensor([s for row in rows for s in row if isinstance(s, tuple)], dtype=torch.long).view(-1, 3)


def batch(rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token `rows` padded (id 0, mask 0) on the left or right into `[B, P]` ids and mask."""
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        start = width - len(row) if left else 0
        ids[b, start : start + len(row)] = torch.tensor(row)
        mask[b, start : start + len(row)] = 1
    return ids, mask


@settings(max_examples=120, deadline=None)
@given(rows=prompts(), left=st.booleans(), unmasked=st.booleans())
def test_positions_and_deltas_equal_the_models_get_rope_index(core, rows, left, unmasked):
    ids, mask = batch([tokens(row) for row in rows], left)
    given_mask = None if unmasked and bool(mask.all()) else mask  # no mask: only rows without padding
    grid, types = grids(rows), (ids == IMAGE).int()
    expected, deltas = core.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=given_mask)
    got, got_deltas = rope_index(types == 1, grid, MERGE, given_mask)
    assert got.dtype == expected.dtype and got_deltas.dtype == deltas.dtype
    assert torch.equal(got, expected)
    assert torch.equal(got_deltas, deltas)
    assert torch.equal(rope_deltas(expected, given_mask), deltas)  # the deltas of positions a caller gives


@settings(max_examples=60, deadline=None)
@given(rows=prompts(adjacent=True), left=st.booleans())
def test_adjacent_images_are_told_apart_by_their_grids(rows, left):
    """Two images with no text between (`get_rope_index` would take them for one): as the model's
    rule with a text token between them, that token's column removed and the positions after it one less."""
    from transformers import AutoModel

    core = AutoModel.from_config(tiny_qwen_config("qwen2-vl", vocab_size=16, image_token_id=IMAGE))
    spaced = [[1 if i and s == 0 else s for i, s in enumerate(row)] for row in rows]  # a token between images
    ids, mask = batch([tokens(row) for row in rows], left)
    got, deltas = rope_index(ids == IMAGE, grids(rows), MERGE, mask)
    spaced_ids, spaced_mask = batch([tokens(row) for row in spaced], left)
    reference, _ = core.get_rope_index(
        spaced_ids, (spaced_ids == IMAGE).int(), image_grid_thw=grids(rows), attention_mask=spaced_mask
    )
    for b, row in enumerate(rows):
        added = torch.tensor([i > 0 and s == 0 for i, s in enumerate(row) for _ in tokens([spaced[b][i]])])
        expected = (reference[:, b, spaced_mask[b].bool()] - added.long().cumsum(0))[:, ~added]
        assert torch.equal(got[:, b, mask[b].bool()], expected)
        assert int(deltas[b]) == int(expected.max()) + 1 - len(tokens(row))


def test_no_host_read():
    """On the `meta` device (no data) any host read, data-dependent shape or branch on values raises:
    `rope_index` runs there, the model's `get_rope_index` does not."""
    from transformers import AutoModel

    ids, mask = batch([tokens([2, (1, 4, 4), 1, (1, 2, 6), 1]), tokens([1, (1, 6, 2), 3])], left=True)
    grid = grids([[2, (1, 4, 4), 1, (1, 2, 6), 1], [1, (1, 6, 2), 3]])
    meta = {"image": (ids == IMAGE).to("meta"), "grid": grid.to("meta"), "mask": mask.to("meta")}
    positions, deltas = rope_index(meta["image"], meta["grid"], MERGE, meta["mask"])
    assert (positions.shape, deltas.shape) == ((3, *ids.shape), (2, 1))
    core = AutoModel.from_config(tiny_qwen_config("qwen2-vl", vocab_size=16, image_token_id=IMAGE))
    with pytest.raises(NotImplementedError):
        core.get_rope_index(
            meta["image"].long(), meta["image"].int(), image_grid_thw=meta["grid"], attention_mask=meta["mask"]
        )


def keep_all_without_get_rope_index(tiny, monkeypatch) -> None:
    """Inside the context, the model's `get_rope_index` unavailable: `generate`'s prompt positions
    (`MRope.generation`) equal the model's own `_prepare_position_ids_for_generation` and its
    `rope_deltas`, and keep-all forward logits and `generate` (greedy, and 2 beams) of a left-padded
    batch of prompts with images of different sizes are bit-identical to the unpruned model's."""
    inputs = tiny.inputs(["what colour is the square", "how many"], sized_images([(40, 70), (64, 48)], seed=4))
    model = tiny.model
    reference = model(**inputs).logits
    greedy, beams = (model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=n) for n in (1, 2))
    expected = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    deltas = model.model.rope_deltas
    model.model.rope_deltas = None

    def unavailable(*args, **kwargs):
        raise AssertionError("get_rope_index was called")

    monkeypatch.setattr(model.model, "get_rope_index", unavailable)
    with tp.apply(model, "divprune@1.0") as run:
        assert torch.equal(run.adapter.generation_positions(dict(inputs)), expected)
        assert torch.equal(model.model.rope_deltas, deltas)
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), greedy)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2), beams)


@torch.no_grad()
def test_qwen2_vl_positions_the_prompt_without_the_models_get_rope_index(tiny_qwen, monkeypatch):
    keep_all_without_get_rope_index(tiny_qwen, monkeypatch)


@torch.no_grad()
def test_qwen3_vl_positions_the_prompt_without_the_models_get_rope_index(tiny_qwen3, monkeypatch):
    keep_all_without_get_rope_index(tiny_qwen3, monkeypatch)
