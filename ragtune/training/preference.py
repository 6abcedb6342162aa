"""The preference step after SFT: train the answer-or-abstain margin itself.

The decision scores an answer by how much more likely the model finds its candidate than the
abstain answer (``ragtune.answerability``, feature ``margin``). SFT only raises the target's
likelihood; this step also lowers the competitor's, on pairs built from the same examples:

- an example whose context holds the answer: the answer over the abstain answer;
- the same question with the oracle removed or cut (``raft.contrastive``, ``raft.ablated_twin``),
  or changed so that its context misses it (``raft.swapped_twin``),
  or without an oracle found: the abstain answer over the now unsupported answer;
- an unanswerable question with a ``plausible_answer`` (SQuAD v2 ships one, ``gen-qa`` writes
  one): the abstain answer over that plausible-but-wrong answer.

TRL's CPO trainer (reference-free, so no second model; ``loss_type=simpo`` compares per-token
mean log-probabilities, the scale of ``margin``) runs on the SFT model's LoRA, with the exact
token ids SFT trained on. Off unless ``train.preference.num_train_epochs > 0``.

The step can fail without a spike: on the H200 one seed's loss drifted from 0.66 to 1.36 over
its epoch (gradient norms up to 687) and the model came out reading worse (F1 of its candidate
answers 46.7 against ~68 on other splits; 53.2 overall, below always abstaining). One epoch
sees each pair once, so its logged loss is measured on pairs it had not trained on: when the
last quarter's median is ``train.preference.undo_above`` times the first quarter's
(:func:`loss_rise`), the step made its own objective worse and the LoRA is put back as SFT left it.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragtune.training import TrainError

log = logging.getLogger(__name__)

# cfg.train.preference keys that are CPOConfig arguments of the same name
CPO_ARGS = (
    "num_train_epochs",
    "learning_rate",
    "loss_type",
    "beta",
    "simpo_gamma",
    "cpo_alpha",
)
ANSWER_OVER_ABSTAIN = ("oracle",)  # the context holds the answer
ABSTAIN_OVER_ANSWER = (
    "contrast_no_oracle",
    "ablated_no_answer",
    "swapped_question",
    "abstain_no_oracle",
)


@dataclass
class PreferenceResult:
    """What the preference step did, for the manifest."""

    pairs: int
    by_kind: dict[str, int]
    steps: int
    seconds: float
    first_loss: float | None
    final_loss: float | None
    final_margin: float | None  # chosen minus rejected reward in the last logged window
    loss_rise: float | None = None  # median logged loss, last quarter / first quarter
    undone: bool = False  # the rise passed train.preference.undo_above: the SFT LoRA was kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preference_pairs(examples: list[dict[str, Any]], abstain: str) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) response pairs from built training examples.

    ``abstain`` is the prompt schema's abstain answer. Examples of other kinds (closed-book,
    answer-from-memory) and unanswerable ones without a plausible answer give no pair.
    """
    pairs = []
    for ex in examples:
        kind, answer = ex["kind"], (ex.get("answer") or "").strip()
        if kind in ANSWER_OVER_ABSTAIN and answer:
            chosen, rejected = answer, abstain
        elif kind in ABSTAIN_OVER_ANSWER and answer:
            chosen, rejected = abstain, answer
        elif kind == "unanswerable" and (ex.get("plausible") or "").strip():
            chosen, rejected = abstain, ex["plausible"].strip()
        else:
            continue
        pairs.append({"prompt": ex["prompt"], "chosen": chosen, "rejected": rejected, "kind": kind})
    return pairs


def encode_pairs(
    pairs: list[dict[str, Any]], tokenizer: Any, schema: Any, max_seq_length: int
) -> tuple[Any, int]:
    """A datasets.Dataset of the pairs with SFT's token ids (prompt ids, response ids + EOS);
    pairs whose longer side exceeds ``max_seq_length`` are dropped. (dataset, dropped)."""
    from datasets import Dataset

    from ragtune.training.data import encode_completion

    rows: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "kind")}
    rows |= {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    dropped = 0
    for p in pairs:
        p_ids = schema.encode_prompt(tokenizer, p["prompt"])
        c_ids = encode_completion(tokenizer, schema.render_completion(p["chosen"], tokenizer))
        r_ids = encode_completion(tokenizer, schema.render_completion(p["rejected"], tokenizer))
        if len(p_ids) + max(len(c_ids), len(r_ids)) > max_seq_length:
            dropped += 1
            continue
        for k in ("prompt", "chosen", "rejected", "kind"):
            rows[k].append(p[k])
        rows["prompt_ids"].append(p_ids)
        rows["chosen_ids"].append(c_ids)
        rows["rejected_ids"].append(r_ids)
    return Dataset.from_dict(rows), dropped


def _tokenized_row(row: dict[str, Any]) -> dict[str, list[int]]:
    """CPOTrainer's tokenized row from our ids: the loss on the response tokens only."""
    p = list(row["prompt_ids"])
    out: dict[str, list[int]] = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for side in ("chosen", "rejected"):
        ids = p + list(row[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(p) + list(row[f"{side}_ids"])
    return out


def trainer_class() -> type:
    """TRL's CPOTrainer, reading the token ids SFT used instead of re-tokenizing text (TRL
    would encode prompt + response as one string and add its own BOS/EOS)."""
    import warnings

    with warnings.catch_warnings():  # TRL warns that trl.experimental may change
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer

    class RagtuneCPOTrainer(CPOTrainer):
        def tokenize_row(self, feature, model=None):  # noqa: ANN001, ANN201
            return _tokenized_row(feature)

    return RagtuneCPOTrainer


MIN_LOGS = 8  # fewer logged losses than this: too few to judge a rise


def loss_rise(losses: list[float]) -> float | None:
    """Median of the last quarter of ``losses`` over the median of the first quarter; None
    with fewer than :data:`MIN_LOGS` losses or a first-quarter median that is not positive."""
    if len(losses) < MIN_LOGS:
        return None
    q = len(losses) // 4
    first, last = statistics.median(losses[:q]), statistics.median(losses[-q:])
    return last / first if first > 0 else None


def cpo_config(
    cfg: Any, out_dir: Path, precision: dict[str, bool], cuda: bool, backend: str = "hf"
) -> Any:
    import warnings

    from ragtune.config import plain
    from ragtune.training.backends import trainer_checkpointing
    from ragtune.training.distributed import fsdp_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig

    t, p = cfg.train, cfg.train.preference
    return CPOConfig(
        **{k: plain(p[k]) for k in CPO_ARGS},
        output_dir=str(out_dir),
        per_device_train_batch_size=int(t.per_device_train_batch_size),
        gradient_accumulation_steps=int(t.gradient_accumulation_steps),
        warmup_steps=float(t.warmup_steps),
        lr_scheduler_type=str(t.lr_scheduler_type),
        optim=str(t.optim),
        max_grad_norm=float(t.max_grad_norm),
        adam_beta2=float(t.adam_beta2),
        logging_steps=int(t.logging_steps),
        report_to=plain(t.report_to),
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        save_strategy="no",  # a short step on a finished SFT model: rerun rather than resume
        bf16=bool(precision["bf16"]),
        fp16=bool(precision["fp16"]),
        use_cpu=not cuda,
        max_length=int(cfg.model.max_seq_length),
        # as SFT's (off under FSDP, whose own checkpointing wraps the model): each pair is two
        # sequences, so this step holds twice SFT's activations
        gradient_checkpointing=trainer_checkpointing(t, backend, fsdp=bool(fsdp_args(cfg))),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def fit_preference(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    schema: Any,
    examples: list[dict[str, Any]],
    out_dir: Path,
    precision: dict[str, bool],
    cuda: bool,
    backend: str = "hf",
) -> PreferenceResult:
    """Train ``model`` (the SFT model's LoRA, in place) on the preference pairs."""
    pairs = preference_pairs(examples, schema.abstain)
    if not pairs:
        raise TrainError(
            "train.preference.num_train_epochs > 0 but no example gives a preference pair "
            "(they come from answerable examples with an oracle, contrastive twins and "
            "unanswerable records with a plausible_answer); set it to 0"
        )
    dataset, dropped = encode_pairs(pairs, tokenizer, schema, int(cfg.model.max_seq_length))
    by_kind: dict[str, int] = {}
    for kind in dataset["kind"]:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    log.info(
        "preference step: %d pairs %s%s",
        len(dataset),
        by_kind,
        f", {dropped} too long" * bool(dropped),
    )
    args = cpo_config(cfg, out_dir, precision, cuda, backend)
    cpo = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # the LoRA as SFT left it (a few MB even at 12B): what an undone step puts back
    sft_lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    start = time.perf_counter()
    cpo.train()
    seconds = time.perf_counter() - start
    logged = [h for h in cpo.state.log_history if "loss" in h]
    margins = [h[k] for h in logged for k in h if k.endswith("rewards/margins")]
    rise = loss_rise([float(h["loss"]) for h in logged])
    limit = cfg.train.preference.get("undo_above")
    undone = rise is not None and limit is not None and rise > float(limit)
    if undone:
        _put_back(model, sft_lora)
        log.warning(
            "preference step undone: its loss rose %.2fx over the epoch "
            "(train.preference.undo_above=%s); the SFT model is kept",
            rise,
            limit,
        )
    result = PreferenceResult(
        pairs=len(dataset),
        by_kind=by_kind,
        steps=int(cpo.state.global_step),
        seconds=round(seconds, 2),
        first_loss=float(logged[0]["loss"]) if logged else None,
        final_loss=float(logged[-1]["loss"]) if logged else None,
        final_margin=float(margins[-1]) if margins else None,
        loss_rise=round(rise, 4) if rise is not None else None,
        undone=undone,
    )
    log.info(
        "preference step: %d steps in %.1f s, loss %s -> %s, reward margin %s",
        result.steps,
        seconds,
        result.first_loss,
        result.final_loss,
        result.final_margin,
    )
    return result


def _put_back(model: Any, weights: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
