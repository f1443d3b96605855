"""`vision:L` inside Qwen2-VL and Qwen2.5-VL towers: whole merge units kept or merged before block L.

Checked against the tower run by hand (the unmodified blocks on the kept units, their rotary
tables, per-image `cu_seqlens` and, on Qwen2.5-VL, windows recounted over the kept units), the LLM
fed the kept units at their original M-RoPE positions; keep-all bit-identical; batch equals single
prompts; generate() equals a manual loop; the per-unit tower signals against a full attention map."""

import pytest
import torch
from conftest import TinyQwen, build_tiny_qwen, sized_images
from einops import rearrange
from reference import greedy_with_logits, teacher_forced_logits, topk_reference

import tokenprune as tp
from tokenprune.adapters.qwen_tower import QwenTower
from tokenprune.signals import PatchAttention, PatchKeyNorm
from tokenprune.strategy import ModelInfo

SIZES = [(40, 70), (64, 48)]  # merged grids 2x4 and 4x3
QUESTIONS = ["what colour is the square", "how many"]


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def tiny_tower(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyQwen:
    """Three tower blocks; Qwen2.5-VL: windows of 2x2 merge units (32 px), block 1 full attention."""
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    extra = {"depth": 3} | ({"window_size": 32, "fullatt_block_indexes": [1]} if request.param != "qwen2-vl" else {})
    path = build_tiny_qwen(tmp_path_factory.mktemp("tower"), request.param, **extra)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return TinyQwen(
        path, model, Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


def tower_slots(visual, grid: torch.Tensor) -> list[tuple[int, int, tuple[int, ...]]]:
    """Each merge unit as `(image, raster index, window)` in the tower's order, built by hand: raster
    order, or Qwen2.5-VL's windows of `window_size // patch // merge` units a side, row by row."""
    merge = visual.spatial_merge_size
    side = getattr(visual, "window_size", None)
    side = side // visual.patch_size // merge if side is not None else None
    slots = []
    for i, (_, h, w) in enumerate(grid.tolist()):
        cols = w // merge
        units = [
            (i, r * cols + c, (r // side, c // side) if side else ()) for r in range(h // merge) for c in range(cols)
        ]
        slots += sorted(units, key=lambda u: u[2]) if side else units  # stable: raster order inside a window
    return slots


def cu_of(keys: list) -> torch.Tensor:
    """`cu_seqlens` of runs of equal `keys` (one per unit, 4 patches each)."""
    lengths = [0]
    for j, key in enumerate(keys):
        if j and key == keys[j - 1]:
            lengths[-1] += 4
        else:
            lengths.append(4)
    return torch.tensor(lengths, dtype=torch.int32).cumsum(0).to(torch.int32)


@torch.no_grad()
def tower_by_hand(visual, pixels: torch.Tensor, grid: torch.Tensor, block: int, kept: list[list[int]], weights=None):
    """The merged tokens of each image's kept units `[k_i, D]` (raster order): blocks `0..block-1`
    on every unit, blocks `block..` on the kept ones (their rows of `weights` `[k, n]` mixing the
    units of the image in raster order, patch by patch, when merged)."""
    from transformers.vision_utils import get_vision_position_ids

    slots = tower_slots(visual, grid)
    hidden = visual.patch_embed(pixels)  # raster order of units, image by image
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, visual.spatial_merge_size))
    starts = torch.tensor([0, *(grid.prod(-1) // 4).cumsum(0).tolist()])
    tower = torch.tensor([int(starts[i]) + r for i, r, _ in slots])  # raster unit at each tower slot
    units = lambda t: rearrange(t, "(u p) d -> u p d", p=4)  # noqa: E731
    hidden, cos, sin = (units(t)[tower] for t in (hidden, cos, sin))
    full_blocks = getattr(visual, "fullatt_block_indexes", None) or list(range(len(visual.blocks)))

    def run(blocks, hidden, cos, sin, keys):
        for index in blocks:
            segment = [k[0] for k in keys] if index in full_blocks else keys
            hidden = units(
                visual.blocks[index](
                    rearrange(hidden, "u p d -> (u p) d"),
                    cu_seqlens=cu_of(segment),
                    position_embeddings=(rearrange(cos, "u p d -> (u p) d"), rearrange(sin, "u p d -> (u p) d")),
                )
            )
        return hidden

    keys = [(i, win) for i, _, win in slots]
    hidden = run(range(block), hidden, cos, sin, keys)
    new_slots, states = [], []
    for i, rows in enumerate(kept):
        mine = sorted((r, j) for j, (img, r, _) in enumerate(slots) if img == i)  # raster order
        at = torch.tensor([j for _, j in mine])
        for row, r in enumerate(rows):
            j = next(j for rr, j in mine if rr == r)
            new_slots.append(j)
            states.append(hidden[j] if weights is None else torch.einsum("n,npd->pd", weights[i][row], hidden[at]))
    order = sorted(range(len(new_slots)), key=lambda a: new_slots[a])  # tower order
    picked = [new_slots[a] for a in order]
    hidden = run(
        range(block, len(visual.blocks)),
        torch.stack([states[a] for a in order]),
        cos[picked],
        sin[picked],
        [keys[j] for j in picked],
    )
    merged = visual.merger(rearrange(hidden, "u p d -> (u p) d"))
    out = [None] * len(order)
    for position, a in enumerate(order):
        out[a] = merged[position]
    features, at = [], 0
    for rows in kept:
        features.append(torch.stack(out[at : at + len(rows)]))
        at += len(rows)
    return features


@torch.no_grad()
def logits_by_hand(model, inputs: dict, kept: list[list[int]], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Last-token logits of each prompt fed its kept units' features at their original M-RoPE positions."""
    ids, mask, image = inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id
    positions, _ = model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
    )
    out = []
    for b in range(ids.shape[0]):
        slots = (ids[b] == image).nonzero()[:, 0]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[slots] = False
        keep[slots[kept[b]]] = True
        columns = keep.nonzero()[:, 0]
        embeds = model.model.get_input_embeddings()(ids[b, columns])
        embeds[ids[b, columns] == image] = features[b]
        out.append(
            model(
                inputs_embeds=embeds[None],
                attention_mask=mask[b, columns][None],
                position_ids=positions[:, b : b + 1, columns],
            ).logits[0, -1]
        )
    return out


@pytest.mark.parametrize(
    ("spec", "block", "kept"),
    [
        ("uniform@3@vision:1", 1, (3, 3)),
        ("divprune@5@vision:2", 2, (5, 5)),
        ("pool@4@vision:1", 1, (4, 4)),
        ("tome@0.5@vision:2", 2, (4, 6)),
        ("fopru(layer=0)@4@vision:1", 1, (4, 4)),
    ],
)
@torch.no_grad()
def test_logits_equal_the_tower_and_llm_run_by_hand_on_the_kept_units(tiny_tower, spec, block, kept):
    model = tiny_tower.model
    inputs = tiny_tower.inputs(QUESTIONS, sized_images(SIZES, seed=1))
    with tp.apply(model, spec) as run:
        got = model(**inputs).logits[:, -1]
    stage = run.trace[0].stages[0]
    assert stage.at == f"vision:{block}" and stage.counts == [(8, kept[0]), (12, kept[1])]
    rows = [k.tolist() for k in stage.kept]
    assert all(r == sorted(set(r)) for r in rows)
    features = tower_by_hand(
        model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"], block, rows, stage.weights
    )
    for b, expected in enumerate(logits_by_hand(model, inputs, rows, features)):
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)
    width = inputs["input_ids"].shape[1]  # padding stays: rows shrink by their dropped units
    assert run.trace[0].seq_len_out == width - min(8 - kept[0], 12 - kept[1])


@torch.no_grad()
def test_keep_all_in_the_tower_is_bit_identical(tiny_tower):
    model = tiny_tower.model
    inputs = tiny_tower.inputs(QUESTIONS, sized_images(SIZES, seed=2))
    reference = model(**inputs).logits
    for spec in ["uniform@1.0@vision:1", "divprune@1.0@vision:2 > pool@1.0"]:
        with tp.apply(model, spec) as run:
            assert torch.equal(model(**inputs).logits, reference)
        assert run.trace[0].stages[0].counts == [(8, 8), (12, 12)]
    assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize(
    "spec", ["divprune@5@vision:1", "pool@4@vision:2 > divprune@3", "fopru(layer=0)@6@vision:1 > fastv@3@llm:1"]
)
@torch.no_grad()
def test_batch_equals_single_prompts_and_decode_equals_a_manual_loop(tiny_tower, spec):
    model, imgs = tiny_tower.model, sized_images(SIZES, seed=3)
    inputs = tiny_tower.inputs(QUESTIONS, imgs)
    width = inputs["input_ids"].shape[1]
    with tp.apply(model, spec):
        batch = model(**inputs).logits[:, -1]
        generated = greedy_with_logits(model, inputs, 4)
        manual = teacher_forced_logits(model, inputs, generated.sequences[:, width:][:, :3], positions=False)
        singles = [model(**tiny_tower.inputs([q], [imgs[i]])).logits[0, -1] for i, q in enumerate(QUESTIONS)]
    for step, logits in enumerate(manual):
        torch.testing.assert_close(generated.logits[step], logits, atol=1e-5, rtol=1e-5)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def per_unit_by_hand(visual, pixels: torch.Tensor, grid: torch.Tensor, block: int) -> tuple[list, list]:
    """Per image, in raster order: each unit's mean attention received (the full softmax map of its
    segment, column mean over that segment's queries, head mean) and its mean key L2 norm, block `block`."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    captured = {}
    handle = visual.blocks[block].register_forward_pre_hook(
        lambda m, a, kw: captured.update(hidden=a[0], **kw), with_kwargs=True
    )
    visual(pixels, grid_thw=grid)
    handle.remove()
    attn = visual.blocks[block].attn
    x = visual.blocks[block].norm1(captured["hidden"])
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])  # [S, H, d]
    cu = captured["cu_seqlens"].tolist()
    received = torch.zeros(x.shape[0])
    for a, b in zip(cu, cu[1:], strict=False):
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling, dim=-1)
        received[a:b] = probs.mean(1).mean(0)
    norms = k.flatten(1).norm(dim=-1)
    slots = tower_slots(visual, grid)
    per_unit = [rearrange(t, "(u p) -> u p", p=4).mean(1) for t in (received, norms)]
    out = []
    for values in per_unit:
        images = [[] for _ in range(grid.shape[0])]
        for j, (i, _r, _) in sorted(enumerate(slots), key=lambda s: (s[1][0], s[1][1])):
            images[i].append(float(values[j]))
        out.append(images)
    return out[0], out[1]


@pytest.mark.parametrize("block", [0, 1, 2])
@torch.no_grad()
def test_tower_signals_equal_the_full_attention_map(tiny_tower, block):
    model = tiny_tower.model
    visual = model.model.visual
    inputs = tiny_tower.inputs(QUESTIONS, sized_images(SIZES, seed=4))
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    received, norms = per_unit_by_hand(visual, pixels, grid, block)
    signals = {PatchAttention(layer=block, axis="col", scores="softmax"), PatchKeyNorm(layer=block)}
    tower = QwenTower(visual, [], ModelInfo(vision_layers=3), signals)
    handles = tower.attach()
    try:
        visual(pixels, grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    run = tower.run
    for i in range(2):
        at = run.rows([i])
        got = run.signal_rows(at)
        torch.testing.assert_close(
            got[PatchAttention(layer=block, axis="col", scores="softmax")][0], torch.tensor(received[i])
        )
        torch.testing.assert_close(got[PatchKeyNorm(layer=block)][0], torch.tensor(norms[i]))


@pytest.mark.parametrize("spec", ["fopru(significance='col',scores='softmax')@5", "visionzip(dominant='received')@5"])
@torch.no_grad()
def test_received_attention_ranks_the_units_at_the_projector(tiny_tower, spec):
    """FoPru's column significance, and VisionZip's dominant tokens without [CLS], rank the merge units
    by the attention they receive in the last block."""
    model = tiny_tower.model
    inputs = tiny_tower.inputs(QUESTIONS, sized_images(SIZES, seed=5))
    received, _ = per_unit_by_hand(model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"], 2)
    with tp.apply(model, spec) as run:
        model(**inputs)
    stage = run.trace[0].stages[0]
    dominant = 5 - round(10 * 5 / 64) if spec.startswith("visionzip") else 5
    for i in range(2):
        assert torch.tensor(received[i]).allclose(stage.scores[i], atol=1e-6)
        best = set(topk_reference(received[i], dominant))
        assert best <= set(stage.kept[i].tolist()) and len(stage.kept[i]) == 5


def test_refusals(tiny_tower):
    with pytest.raises(tp.errors.SignalError, match="has no \\[CLS\\] token"):
        with tp.apply(tiny_tower.model, "vtc-cls(layer=0)@4@vision:1"):
            pass
    with pytest.raises(tp.errors.SignalError, match="exist in blocks 0..0 only"):
        with tp.apply(tiny_tower.model, "fopru(layer=1)@4@vision:1"):
            pass
    with pytest.raises(tp.errors.PlaceError, match="after block 2"):
        with tp.apply(tiny_tower.model, "uniform@4@vision:3"):
            pass
