"""The supervised loss of a batch of demonstrations: mean cross-entropy over the trained tokens.

Demonstrations usually share their system turn, and with tool schemas it is most of each row.
When every row of a batch has the same prefix, the prefix runs once (batch 1) and its KV cache
is repeated for the rows (:func:`batch_loss` with ``share_prefix``): the same loss and gradients
as full rows at a fraction of the cost. Rows with different prefixes run as full rows
(:func:`demo_loss` decides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from axpo_learner.sft.rows import SftRow


def _images(rows: Sequence[SftRow], device: torch.device) -> dict[str, torch.Tensor]:
    pixels = [pv for r in rows for pv in r.pixel_values]
    if not pixels:
        return {}
    grids = [g for r in rows for g in r.image_grid_thw]
    return {
        "pixel_values": torch.cat(pixels).to(device),
        "image_grid_thw": torch.cat(grids).to(device),
    }


def batch_loss(
    model: Any,
    prefix_ids: Sequence[int],
    rows: Sequence[SftRow],
    *,
    pad_id: int,
    image_token_id: int,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens of ``rows``, each preceded by ``prefix_ids``
    (the rows' own ``prefix_ids`` are not read), differentiable, on the model's device.

    With ``share_prefix`` the prefix runs once and its KV cache is repeated for the rows;
    without, every row runs whole (an empty prefix is allowed then).
    """
    device = next(model.parameters()).device
    n = len(rows)
    p = len(prefix_ids)
    width = max(len(r.token_ids) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
        attention[i, : len(r.token_ids)] = 1
        loss_mask[i, : len(r.token_ids)] = torch.tensor(r.loss_mask, dtype=torch.bool)
    ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
    prefix = torch.tensor([list(prefix_ids)] * n, dtype=torch.long).reshape(n, p).to(device)
    full_ids = torch.cat([prefix, ids], dim=1)
    full_attention = torch.cat(
        [torch.ones((n, p), dtype=torch.long, device=device), attention], dim=1
    )
    full_mm = ((full_ids == image_token_id) & full_attention.bool()).long()
    images = _images(rows, device)
    # Position t of the rows predicts token t + 1. The first row token (the user turn's
    # <|im_start|>, never trained) would be predicted by the prefix.
    weights = loss_mask[:, 1:]
    targets = ids[:, 1:][weights]
    if not share_prefix:
        logits = model(
            input_ids=full_ids,
            attention_mask=full_attention,
            mm_token_type_ids=full_mm,
            **images,
        ).logits[:, p:-1]
        return torch.nn.functional.cross_entropy(logits[weights].float(), targets)
    if p == 0:
        raise ValueError("share_prefix needs a non-empty prefix")
    cached = model.model(input_ids=prefix[:1], use_cache=True)
    cache = cached.past_key_values
    cache.batch_repeat_interleave(n)
    positions, _ = model.model.get_rope_index(
        full_ids,
        mm_token_type_ids=full_mm,
        image_grid_thw=images.get("image_grid_thw"),
        attention_mask=full_attention,
    )
    hidden = model.model(
        input_ids=ids,
        attention_mask=full_attention,
        position_ids=positions[:, :, p:],
        past_key_values=cache,
        mm_token_type_ids=full_mm[:, p:],
        use_cache=False,
        **images,
    ).last_hidden_state
    # The output layer runs only where a trained token is predicted.
    logits = model.get_output_embeddings()(hidden[:, :-1][weights])
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def demo_loss(model: Any, rows: Sequence[SftRow], *, pad_id: int, image_token_id: int) -> Any:
    """:func:`batch_loss` of ``rows``, sharing their prefix when they all have the same one,
    else on full rows (prefix and rest joined, the prefix untrained)."""
    first = rows[0].prefix_ids
    if first and all(r.prefix_ids == first for r in rows):
        return batch_loss(model, first, rows, pad_id=pad_id, image_token_id=image_token_id)
    whole = [
        SftRow(
            (),
            [*r.prefix_ids, *r.token_ids],
            [False] * len(r.prefix_ids) + r.loss_mask,
            r.pixel_values,
            r.image_grid_thw,
        )
        for r in rows
    ]
    return batch_loss(
        model, (), whole, pad_id=pad_id, image_token_id=image_token_id, share_prefix=False
    )
