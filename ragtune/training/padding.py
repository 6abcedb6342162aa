"""Batches: padded or padding-free, the padding estimate, and the two loss-side trims.

Unsloth compiles each decoder block as one torch.compile region for padded batches only; its
padding-free (varlen) batches run the blocks eagerly. The constants below are the measured
trade-off at the Mistral-Nemo-12B shape on an H100 (docs/benchmarks.md, "Training throughput
through ragtune's SFT path", item 2): padded steps 0.648 s vs 0.744 s padding-free, for a
one-off ~35 s compile.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ragtune.training.distributed import world_size

PADDED_MAX_WASTE = 0.10  # pad tokens cost GPU time 1:1; the compiled blocks save ~10% a step
BLOCK_COMPILE_S = 35.0  # the one-off compile the padded path pays
SAVED_S_PER_MICRO_BATCH = 0.065  # host time the compiled blocks save per micro-batch


def padding_waste(
    lengths: list[int], batch_size: int, sampling: str = "random", group: int = 0, seed: int = 0
) -> float:
    """Expected share of pad tokens when ``lengths`` are batched ``batch_size`` at a time and
    each batch is padded to its longest row.

    ``random`` shuffles (the Trainer's RandomSampler); ``group_by_length`` sorts each
    mega-batch of ``50 * group`` examples by length first, as transformers'
    ``LengthGroupedSampler`` does (``group`` = batch x gradient accumulation).
    """
    order = list(lengths)
    random.Random(seed).shuffle(order)
    if sampling == "group_by_length":
        mega = 50 * max(group, batch_size)
        order = [
            n for i in range(0, len(order), mega) for n in sorted(order[i : i + mega], reverse=True)
        ]
    real = padded = 0
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded if padded else 0.0


def micro_batches(t: Any, n_examples: int) -> int:
    """Micro-batches (forward/backward passes) one process runs for ``train`` config ``t``."""
    if t.max_steps > 0:
        return int(t.max_steps) * int(t.gradient_accumulation_steps)
    per_epoch = math.ceil(n_examples / (int(t.per_device_train_batch_size) * world_size()))
    return math.ceil(per_epoch * float(t.num_train_epochs))


def choose_padding_free(t: Any, backend: str, lengths: list[int]) -> tuple[bool, str]:
    """``train.padding_free`` resolved for this run: (padding_free, why).

    Packed rows are padding-free by construction (TRL's best-fit packing). The hf backend pads
    unless told otherwise. For Unsloth, ``auto`` pads when batches would pad under
    ``PADDED_MAX_WASTE`` and the run has enough micro-batches to repay the block compile.
    """
    if t.packing:
        return False, "packed rows (padding-free by packing)"
    if t.padding_free is True:
        return True, "padding-free (train.padding_free=true)"
    if t.padding_free is False or backend != "unsloth":
        return False, "padded"
    batch = int(t.per_device_train_batch_size)
    group = batch * int(t.gradient_accumulation_steps)  # what LengthGroupedSampler sorts by
    waste = padding_waste(lengths, batch, str(t.train_sampling_strategy), group)
    n = micro_batches(t, len(lengths))
    needed = math.ceil(BLOCK_COMPILE_S / SAVED_S_PER_MICRO_BATCH)
    if waste >= PADDED_MAX_WASTE:
        return True, (
            f"padding-free: padded batches would be {waste:.0%} padding "
            f"(train.train_sampling_strategy=group_by_length pads less)"
        )
    if n < needed:
        return True, (
            f"padding-free: {n} micro-batches are too few to repay the ~{BLOCK_COMPILE_S:.0f} s "
            f"block compile of padded batches (needs >= {needed})"
        )
    return False, f"padded ({waste:.1%} padding): Unsloth compiles each decoder block"


def drop_redundant_mask(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without its attention mask when the mask only marks right padding.

    A causal model's real tokens never attend to the pads after them and pads carry no label,
    so the loss is unchanged, and attention runs its plain causal kernel: 6,048 -> 6,667
    tokens/s at 12B on an H100 with Unsloth (docs/benchmarks.md, same section, item 3). Left padding and holes keep
    their mask.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or "position_ids" in inputs:
        return inputs
    right_padded = bool((mask[:, 0] == 1).all() and (mask[:, 1:] <= mask[:, :-1]).all())
    if not right_padded:
        return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def completion_only_head(inputs: dict[str, Any]) -> dict[str, Any]:
    """Model inputs that score only the positions predicting a label (not -100).

    ``logits_to_keep`` (sequence positions shared by the batch rows) makes the model apply its
    LM head there only, and ``shift_labels`` gives the loss the matching targets; rows whose
    own label at a kept position is -100 are ignored by the loss as usual.
    """
    import torch

    labels = inputs.get("labels")
    if labels is None:
        return inputs
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:  # nothing to learn in this batch: keep one position for a zero loss
        keep = torch.tensor([labels.shape[1] - 1], device=labels.device)
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}
