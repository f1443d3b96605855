"""Pooled soft tokens and the bidirectional image rule, as pure functions: pooling windows against
explicit loops and against HF's own projector, the image-block mask against loops and against the
mask HF builds for Gemma 3 from `token_type_ids`."""

import pytest
import torch

from tokenprune.adapters.pooled import PooledGrid, bidirectional_image_mask, image_blocks
from tokenprune.errors import InputError


def test_each_soft_token_pools_its_kernel_window_of_patches():
    grid = PooledGrid(patches=6, tokens=3)
    for token in range(9):
        i, j = divmod(token, 3)
        expected = [(2 * i + a) * 6 + 2 * j + b for a in range(2) for b in range(2)]
        assert grid.window(torch.tensor(token)).tolist() == expected
    values = torch.randn(2, 36, 5)
    pooled = grid.pool(values)
    for token in range(9):
        window = grid.window(torch.tensor(token))
        torch.testing.assert_close(pooled[:, token], values[:, window].mean(dim=1))
    assert grid.pool(values[..., 0]).shape == (2, 9)


def test_pooling_a_wrong_grid_is_refused():
    with pytest.raises(InputError, match="cannot be pooled into 4x4 soft tokens"):
        PooledGrid(patches=6, tokens=4)
    with pytest.raises(InputError, match="has 35 entries per image where the 6x6 patch grid has 36"):
        PooledGrid(patches=6, tokens=3).pool(torch.randn(1, 35))


@torch.no_grad()
def test_pooled_patch_features_are_the_projectors_soft_tokens(tiny_gemma3):
    """HF's projector output equals its norm and projection applied to `PooledGrid.pool` of the
    tower's patch features: the window geometry is the projector's."""
    model, core = tiny_gemma3.model, tiny_gemma3.model.model
    grid = PooledGrid.from_config(model.config)
    assert (grid.patches, grid.tokens, grid.kernel) == (8, 4, 2)
    pixels = torch.randn(2, 3, 32, 32)
    patches = core.vision_tower(pixel_values=pixels).last_hidden_state  # [2, 64, D]
    projector = core.multi_modal_projector
    by_hand = projector.mm_soft_emb_norm(grid.pool(patches)) @ projector.mm_input_projection_weight
    torch.testing.assert_close(core.get_image_features(pixels).pooler_output, by_hand, atol=1e-5, rtol=1e-5)


def test_image_blocks_number_each_run_of_image_tokens():
    types = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 1]])
    assert image_blocks(types).tolist() == [[-1, 0, 0, -1, 1, -1, -1], [0, 0, 0, 0, -1, -1, 1]]


def test_bidirectional_mask_against_loops():
    types = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]])
    keys = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    blocks = image_blocks(types).tolist()
    for window in (None, 3):
        got = bidirectional_image_mask(types, keys, window)
        for b in range(2):
            for i in range(8):
                for j in range(8):
                    same = blocks[b][i] >= 0 and blocks[b][i] == blocks[b][j]
                    allowed = bool(keys[b, j]) and (j <= i or same) and (window is None or i - j < window)
                    assert bool(got[b, i, j]) == allowed, (b, i, j, window)


@torch.no_grad()
def test_hf_builds_the_same_mask_for_gemma3(tiny_gemma3):
    """The masks Gemma 3's global and sliding layers receive from `token_type_ids` (left padding,
    one image per row) are `bidirectional_image_mask` over the real queries: the rule the adapter
    relies on HF to rebuild over the kept tokens."""
    from conftest import images

    model = tiny_gemma3.model
    inputs = tiny_gemma3.inputs(["what colour is the square", "how"], images(2))
    seen = {}
    layers = model.model.language_model.layers

    def record(i: int):
        def hook(module, args, kwargs):
            seen[i] = kwargs["attention_mask"]

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    window = model.config.text_config.sliding_window
    real = inputs["attention_mask"].bool()
    for i, kind in enumerate(model.config.text_config.layer_types):
        mask = seen[i][:, 0].bool() if seen[i].dtype == torch.bool else seen[i][:, 0] == 0
        expected = bidirectional_image_mask(
            inputs["token_type_ids"], inputs["attention_mask"], window if kind == "sliding_attention" else None
        )
        assert torch.equal(mask & real[:, :, None], expected & real[:, :, None]), kind
