"""Independent, slow, obvious reference implementations used by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForImageTextToText

from tokenprune.compat import cache_kwarg, output_cache


def cls_attention_eager(path: str, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per block, `[I, N]` head-mean [CLS] attention over patches, from an eager-attention copy of
    the model run with `output_attentions=True` (the official VTC-CLS route)."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    return [a.mean(dim=1)[:, 0, 1:] for a in out.attentions]


def topk_reference(scores: list[float], k: int) -> list[int]:
    """The k best indices by (score descending, index ascending), returned ascending."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def manual_greedy(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one prefill, then one cached forward per token, passing the
    attention mask and position ids as generate() builds them. Returns `[B, steps]` new tokens."""
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(**inputs, position_ids=positions, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=positions,
            **{cache_kwarg(): output_cache(out)},
            use_cache=True,
        )
    return torch.cat(tokens, dim=1)


@contextmanager
def layer_lengths(model) -> Iterator[dict[int, list[int]]]:
    """Inside, `seen[i]` lists the sequence length decoder layer `i`'s attention receives, per call."""
    layers = model.model.language_model.layers
    seen: dict[int, list[int]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append(kw["hidden_states"].shape[1]), with_kwargs=True
        )
        for i, layer in enumerate(layers)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def teacher_forced_logits(model, inputs: dict, tokens: torch.Tensor, positions: bool = True) -> list[torch.Tensor]:
    """A prefill, then one cached forward per column of `tokens` `[B, n]` (the tokens fed, not
    argmax), passing the extended attention mask and, with `positions`, 1D position ids counted as
    `generate` counts them (without, the model or adapter derives them). Returns the `n + 1`
    last-token logits `[B, V]`."""
    out = model(**inputs, use_cache=True)
    logits, mask = [out.logits[:, -1]], inputs["attention_mask"]
    ids = (mask.cumsum(-1) - 1).clamp_min(0)
    for step in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(tokens[:, :1])], dim=1)
        ids = ids[:, -1:] + 1
        extra = {"position_ids": ids} if positions else {}
        out = model(
            input_ids=tokens[:, step : step + 1],
            attention_mask=mask,
            **{cache_kwarg(): output_cache(out)},
            use_cache=True,
            **extra,
        )
        logits.append(out.logits[:, -1])
    return logits


def greedy_with_logits(model, inputs: dict, steps: int, **kwargs):
    """`generate` for exactly `steps` greedy tokens, with each step's raw logits (`.sequences`,
    `.logits`); `kwargs`: more `generate` arguments (a cache, a cache implementation)."""
    return model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def assert_generate_matches(tiny, spec: str, questions: list[str], imgs: list, steps: int = 4):
    """Under `spec`, batched `generate()` equals the manual decode loop and each prompt generated
    alone; returns the run."""
    import tokenprune as tp

    inputs = tiny.inputs(questions, imgs)
    with torch.no_grad(), tp.apply(tiny.model, spec) as run:
        generated = tiny.model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        manual = manual_greedy(tiny.model, inputs, steps)
        singles = [
            tiny.model.generate(**tiny.inputs([q], [imgs[i]]), max_new_tokens=steps, do_sample=False)
            for i, q in enumerate(questions)
        ]
    width = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, width:], manual)
    for i, single in enumerate(singles):
        assert torch.equal(generated[i, width:], single[0, -steps:])
    return run


def assert_batch_matches_singles_and_loop(tiny, spec: str, questions: list[str], imgs: list, steps: int = 4):
    """Under `spec`, the batch's last-position logits equal each prompt's alone, and batched
    `generate()` equals the manual decode loop up to each row's first EOS (generate pads after
    it); returns the run."""
    import tokenprune as tp

    model = tiny.model
    inputs = tiny.inputs(questions, imgs)
    with torch.no_grad(), tp.apply(model, spec) as run:
        batch = model(**inputs).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        manual = manual_greedy(model, inputs, steps)
        singles = [model(**tiny.inputs([q], [imgs[i]])).logits[0, -1] for i, q in enumerate(questions)]
    eos = model.generation_config.eos_token_id
    for row, expected in zip(generated[:, inputs["input_ids"].shape[1] :].tolist(), manual.tolist(), strict=False):
        end = expected.index(eos) + 1 if eos in expected else len(expected)
        assert row[:end] == expected[:end]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-5)
    return run


def patch_keys_eager(path: str, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
    """`[I, N, D]` key projections of the patch tokens in vision block `block`, recomputed from the
    block's input hidden state (its pre-attention LayerNorm, then `k_proj`)."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    block %= len(layers)  # hidden_states[block] is the input of block `block` (0: the embeddings)
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[block]
        layer = layers[block]
        return layer.self_attn.k_proj(layer.layer_norm1(hidden))[:, 1:]


def prumerge_reference(x: torch.Tensor, scores: list[float], keys: torch.Tensor, k: int, neighbours: int):
    """PruMerge on one image with loops: `(index, tokens, weights)` in ascending index order."""
    n = x.shape[0]
    if k == n:
        return list(range(n)), x.double(), None
    kept = topk_reference(scores, k - 1 if k > 1 else 1)
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    rows = []
    for i in kept:
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(unit[i] @ unit[j]), j))
        w = [0.0] * n
        w[i] = 1.0
        for j in others[: min(neighbours, n - 1)]:
            w[j] = scores[j]
        rows.append((i, w))
    if k > 1:
        pruned = [j for j in range(n) if j not in kept]
        best = max(pruned, key=lambda j: (scores[j], -j))
        rows.append((best, [scores[j] if j in pruned else 0.0 for j in range(n)]))
    rows.sort()
    weights = torch.tensor([w for _, w in rows], dtype=torch.float64)
    tokens = weights @ x.double()
    share = weights.clamp_min(0)
    return [i for i, _ in rows], tokens, share / share.sum(-1, keepdim=True)


def visionzip_reference(
    x: torch.Tensor, scores: list[float], keys: torch.Tensor, k: int, c: int, merge: str = "target+mean"
):
    """VisionZip on one image with loops: `(index, tokens)` in ascending index order. `merge`:
    `"target+mean"` (the official code: the target plus the mean of the other members, the target
    alone when none joined) or `"mean"` (the plain mean of the group)."""
    n = x.shape[0]
    c = min(c, k - 1)
    dominant = topk_reference(scores, k - c)
    rest = [j for j in range(n) if j not in dominant]
    outputs = [(i, x[i].double()) for i in dominant]
    if c:
        step = max(1, len(rest) // c)
        targets = [rest[t] for t in range(0, len(rest), step)][:c]
        unit = torch.nn.functional.normalize(keys.double(), dim=-1)
        groups = {t: [t] for t in targets}
        for j in rest:
            if j not in groups:
                sims = [float(unit[j] @ unit[t]) for t in targets]
                groups[targets[sims.index(max(sims))]].append(j)
        for t, members in groups.items():
            if merge == "mean":
                outputs.append((t, torch.stack([x[m].double() for m in members]).mean(0)))
            else:
                others = [x[m].double() for m in members if m != t]
                outputs.append((t, x[t].double() + (torch.stack(others).mean(0) if others else 0.0)))
    outputs.sort(key=lambda o: o[0])
    return [i for i, _ in outputs], torch.stack([t for _, t in outputs])


def tome_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """ToMe rounds on one image with explicit loops: merged tokens, representatives, and how many
    input tokens each output stands for."""
    tokens = [(x[i].double(), 1.0, i) for i in range(x.shape[0])]  # (size-weighted mean, mass, repr)
    while len(tokens) > k:
        r = min(len(tokens) - k, len(tokens) // 2)
        a, b = tokens[0::2], tokens[1::2]
        unit = lambda v: v / v.norm()  # noqa: E731
        best = []
        for i, (va, _, _) in enumerate(a):
            sims = [float(unit(va) @ unit(vb)) for vb, _, _ in b]
            j = max(range(len(b)), key=lambda j: (sims[j], -j))
            best.append((sims[j], i, j))
        order = sorted(best, key=lambda t: (-t[0], t[1]))
        merged, kept = order[:r], sorted(t[1] for t in order[r:])
        b = list(b)
        for _, i, j in merged:
            (va, sa, _), (vb, sb, rb) = a[i], b[j]
            b[j] = ((va * sa + vb * sb) / (sa + sb), sa + sb, rb)
        tokens = sorted([a[i] for i in kept] + b, key=lambda t: t[2])
    return torch.stack([t[0] for t in tokens]).float(), [t[2] for t in tokens], [round(t[1]) for t in tokens]


def newlines_kept_by_hand(where: list[int], kept_positions: set[int], has_crops: bool, base: int) -> int:
    """Grid rows of one packed image (`where`: provenance, -1 at newlines; the first `base` tokens are
    the base image when `has_crops`) that keep one of their tokens, each ended by a newline."""
    count, row_has_kept = 0, False
    for position, value in enumerate(where):
        if value < 0:
            count += row_has_kept
            row_has_kept = False
        elif position in kept_positions and (not has_crops or position >= base):
            row_has_kept = True
    return count


def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity, one image, explicit loops."""
    n = x.shape[0]
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    d = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][c] for c in chosen), -i)))
    return sorted(chosen)


def block_qk_eager(path: str, pixel_values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`([I, T, D], [I, T, D])` query and key projections of all tokens ([CLS] first) in vision block
    `block`, recomputed from the block's input hidden state (pre-attention LayerNorm, projections)."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    block %= len(layers)
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[block]
        layer = layers[block]
        normed = layer.layer_norm1(hidden)
        return layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)


def prumerge_official_reference(
    x: torch.Tensor, scores: list[float], keys: torch.Tensor, neighbours: int, plus: bool = False
) -> tuple[list[int], torch.Tensor]:
    """The official PruMerge (or PruMerge+) on one image, transcribed with numpy and loops:
    `(index, tokens)` in the official output order (kept tokens best first, then PruMerge+'s
    uniform samples, then the extra token at the best pruned position; none when nothing is pruned)."""
    import numpy as np

    n = len(scores)
    values = np.asarray(scores, dtype=np.float32)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = int((values > q3 + 1.5 * (q3 - q1)).sum()) / n
    kept = sorted(range(n), key=lambda j: (-scores[j], j))[: int(n * ratio)]
    if plus and kept:
        stride = max(1, int(int(1 / ratio) / 3))
        kept += [j for j in range(0, n - 1, stride) if j not in kept]
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    rows = []
    for i in kept:
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(unit[i] @ unit[j]), j))
        rows.append(x[i].double() + sum(scores[j] * x[j].double() for j in others[:neighbours]))
    pruned = [j for j in range(n) if j not in kept]
    if not pruned:  # every token kept: the official code appends an all-zero token (N + 1 outputs)
        return kept, torch.stack(rows)
    rows.append(sum(scores[j] * x[j].double() for j in pruned))
    best = max(pruned, key=lambda j: (scores[j], -j))
    return kept + [best], torch.stack(rows)


def fopru_reference(
    query: torch.Tensor, keys: torch.Tensor, heads: int, first: int, k: int, variant: str, grid: tuple[int, int]
) -> list[int]:
    """FoPru on one image (`query`, `keys` `[T, D]`), as the authors' group's code: head-mean
    logits `QK^T / sqrt(d)`, [CLS] row and column dropped, column or row mean by larger variance
    (row on a tie), then the k best (`rank`) or the best whole rows (`row`, k a multiple of cols)."""
    d = query.shape[-1] // heads
    logits = torch.stack(
        [
            query[:, h * d : (h + 1) * d].double() @ keys[:, h * d : (h + 1) * d].double().T / d**0.5
            for h in range(heads)
        ]
    ).mean(0)[first:, first:]
    col, row = logits.mean(0), logits.mean(1)
    sig = (col if col.var() > row.var() else row).tolist()
    if variant == "rank":
        return topk_reference(sig, k)
    rows, cols = grid
    sums = [sum(sig[r * cols : (r + 1) * cols]) for r in range(rows)]
    best = sorted(range(rows), key=lambda r: (-sums[r], r))[: k // cols]
    return sorted(r * cols + c for r in best for c in range(cols))
