"""Telling a bad group from a bad step: a group the queue accepted but the learner cannot
batch (image placeholders that do not match its images, an image that does not decode, token
ids outside the model's vocabulary...) is found by running each group alone through the
trainer's batching path, so the loop can dead-letter it and train on the rest."""

from __future__ import annotations

from collections.abc import Sequence

from axpo.contracts.domain import Group
from axpo.queue import Delivery
from axpo_learner.batch import micro_batches, rows_from_groups
from axpo_learner.trainer import Trainer

# What train_step raises on a bad group: ValueError (inconsistent input), OSError (PIL's
# UnidentifiedImageError: an image that does not decode), IndexError (a token id outside the
# embedding table, raised by the forward).
BAD_INPUT = (ValueError, OSError, IndexError)


def batch_error(trainer: Trainer, group: Group) -> str | None:
    """Why ``group`` alone fails the trainer's batching (the path ``train_step`` runs
    before the forward: rows, images, micro-batches) or the embedding's vocabulary; None
    when it passes. Touches no weights."""
    s = trainer.settings
    enc = trainer.image_encoder
    try:
        rows = rows_from_groups(
            [group],
            trainer.spec,
            scale_by_std=s.scale_advantages_by_std,
            std_floor=s.advantage_std_floor,
            images=enc,
        )
        micro_batches(
            rows, s.micro_batch_tokens, trainer.pad_id, enc.image_token_id if enc else None
        )
    except BAD_INPUT as exc:
        return f"{type(exc).__name__}: {exc}"
    vocab = int(trainer.model.get_input_embeddings().num_embeddings)
    for row in rows:
        top = max(row.token_ids)
        if top >= vocab or min(row.token_ids) < 0:
            return (
                f"trajectory {row.trajectory_id}: token id {top} outside the model's "
                f"vocabulary of {vocab}"
            )
    return None


def split_bad(
    trainer: Trainer, deliveries: Sequence[Delivery]
) -> tuple[list[Delivery], list[tuple[Delivery, str]]]:
    """The deliveries whose group passes :func:`batch_error`, and the others with the reason."""
    good: list[Delivery] = []
    bad: list[tuple[Delivery, str]] = []
    for delivery in deliveries:
        reason = batch_error(trainer, delivery.group)
        if reason is None:
            good.append(delivery)
        else:
            bad.append((delivery, reason))
    return good, bad
