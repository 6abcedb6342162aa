"""The test model can show generation bugs: a broken cache, position or mask changes its output.

Every equivalence test (fast vs slow decoding, batch vs single, stream vs plain, ask / server /
eval) runs on `tiny_lm_path`; this file shows such a test could fail.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DIFFERENT_ENDINGS

STEPS = 12


@pytest.fixture(scope="module")
def lm(tiny_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_lm_path)


def _decode(model, ids, *, position_offset=0, keep_cache=True, mask=None):
    """Greedy decoding by hand; the keyword arguments break one thing on purpose."""
    out = model(ids, attention_mask=mask, use_cache=True)
    past, new = out.past_key_values, [int(out.logits[0, -1].argmax())]
    length = ids.shape[1]
    for _ in range(STEPS - 1):
        step = torch.tensor([[new[-1]]])
        position = torch.tensor([[length + position_offset]])
        if mask is not None:
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        out = model(
            step,
            position_ids=position,
            attention_mask=mask if keep_cache else None,
            past_key_values=past if keep_cache else None,
            use_cache=True,
        )
        past, length = out.past_key_values, length + 1
        new.append(int(out.logits[0, -1].argmax()))
    return new


@torch.no_grad()
@pytest.mark.parametrize("prompt", DIFFERENT_ENDINGS)
def test_a_broken_cache_position_or_mask_changes_greedy_output(lm, prompt):
    model, tok = lm
    ids = tok(prompt, return_tensors="pt").input_ids
    right = _decode(model, ids)
    reference = model.generate(ids, max_new_tokens=STEPS, do_sample=False, use_cache=False)
    assert right == reference[0, ids.shape[1] :].tolist()  # the hand loop is correct

    assert _decode(model, ids, position_offset=1) != right  # decode positions off by one
    assert _decode(model, ids, keep_cache=False) != right  # the cache dropped
    pad = torch.full((1, 3), tok.pad_token_id)
    padded = torch.cat([pad, ids], dim=1)
    masked = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], dim=1)
    unmasked = model.generate(
        padded, attention_mask=torch.ones_like(padded), max_new_tokens=STEPS, do_sample=False
    )[0, padded.shape[1] :].tolist()
    assert unmasked != right  # left padding attended to
    with_mask = model.generate(
        padded, attention_mask=masked, max_new_tokens=STEPS, do_sample=False
    )[0, padded.shape[1] :].tolist()
    assert with_mask == right  # and masked properly it is harmless
    assert right.count(int(ids[0, -1])) < STEPS // 2  # not an echo of the last prompt token


def test_prompts_get_different_answers(lm):
    model, tok = lm
    answers = {
        tuple(
            model.generate(
                tok(p, return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False
            )[0, -6:].tolist()
        )
        for p in DIFFERENT_ENDINGS
    }
    assert len(answers) == len(DIFFERENT_ENDINGS)
