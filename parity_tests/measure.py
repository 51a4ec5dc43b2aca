"""Measure the largest differences per level and family: the numbers docs/parity.md reports
(levels 1-5 per family, level 6 on its own tiny Llama).

    python -m parity_tests.measure            # markdown table on stdout (a few minutes on CPU)

Runs every level on every family of `harness.FAMILIES`, on right- and left-padded batches, the
way the tests do, and prints per (level, family) the largest absolute difference and the
largest norm-wise relative difference, split by tolerance class. Level 6's known
discrepancies (docs/parity.md) are measured and listed apart.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from pathlib import Path

from parity_tests import batches as B
from parity_tests import levels
from parity_tests.decoding import LevelUnavailable, sampler_rows
from parity_tests.harness import FAMILIES, Row, build_checkpoint, load_pair
from parity_tests.shared_cases import CASES, case_rows

__all__ = ["family_rows", "main"]


def family_rows(family: str, tmp: Path) -> list[Row]:
    """Levels 2, 3 and 5 of one family, as the tests run them (dschat loss included)."""
    lm = load_pair(build_checkpoint(family, tmp / f"{family}-lm", kind="lm", seed=0))
    value = load_pair(build_checkpoint(family, tmp / f"{family}-value", kind="value", seed=1))
    vocab, rows = lm.vocab_size, []
    for padding in B.PADDINGS:
        batch = B.forward_batch(vocab, padding)
        width = batch["input_ids"].shape[1]
        rows += levels.forward_rows(padding, batch["input_ids"], batch["attention_mask"], lm=lm,
                                    value=value,
                                    prompt_length=1 if padding == "right" else width - 1)
        rows += levels.sft_rows(lm, B.sft_batch(vocab, padding), padding)
        losses = ("bradley_terry", "kway") + (("dschat_pairwise",) if padding == "right" else ())
        rows += levels.reward_rows(value, padding, pairwise=B.pairwise_batch(vocab, padding),
                                   ranking=B.ranking_batch(vocab, padding), losses=losses)
    conventions = levels.all_terms_conventions()
    prompts = B.forward_batch(vocab, "left", width=6)
    answers, mask = B.synthetic_answers(vocab, 3, 4)
    rollout = levels.rollout_for(lm, value, prompts["input_ids"], prompts["attention_mask"],
                                 answers, mask, conventions=conventions)
    rows += levels.ppo_rows(lm, value, rollout, conventions=conventions,
                            ptx=B.text_batch(vocab, "right"), unsup_coef=27.8)
    prompts = B.forward_batch(vocab, "left", width=6, seed=5)
    try:
        rows += sampler_rows(lm, prompts["input_ids"], prompts["attention_mask"],
                             max_new_tokens=6, eos_token_id=B.EOS, pad_token_id=B.PAD, seed=11)
    except LevelUnavailable:
        pass
    from parity_tests.optimiser import optimiser_rows

    batches = [B.sft_batch(vocab, padding, seed=seed)
               for seed, padding in enumerate(("right", "left", "right"))]
    rows += optimiser_rows(tmp / f"{family}-lm", batches, label=family)
    return rows


def level6_rows(tmp: Path) -> list[Row]:
    """Level 6 (whole runs, adaptive KL, no LoRA) on its tiny Llama, known differences
    included (they land in the summary under their own class)."""
    from parity_tests import iterations as it

    dirs = it.build_level6_models(tmp / "level6")
    config = it.level6_config(tmp, dirs, kl="adaptive")
    t, j = it.run_level6(config, tmp / "level6-runs")
    rows = it.level6_rows(t, j)
    known = [dataclasses.replace(r, tolerance=r.tolerance._replace(
        name="known discrepancy: " + r.quantity.split()[-1]))
        for r in it.known_different_rows(t, j)]
    return rows + known


def _summary(rows: list[Row]) -> dict[tuple[str, str], tuple[float, float]]:
    out: dict[tuple[str, str], tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for r in rows:
        kind = r.tolerance.name
        abs_, rel = out[r.level, kind]
        out[r.level, kind] = (max(abs_, r.max_abs_diff), max(rel, r.max_rel_diff))
    return out


def main() -> None:
    level1 = [row for padding in B.PADDINGS for case in CASES for row in case_rows(case, padding)]
    summaries = {"numpy/torch/jax": _summary(level1)}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            summaries[family] = _summary(family_rows(family, Path(tmp)))
        summaries["level-6 llama"] = _summary(level6_rows(Path(tmp)))
    keys = sorted({key for s in summaries.values() for key in s})
    print("| level | quantity class | " + " | ".join(summaries) + " |")
    print("| --- | --- |" + " --- |" * len(summaries))
    for level, kind in keys:
        cells = []
        for summary in summaries.values():
            if (level, kind) in summary:
                abs_, rel = summary[level, kind]
                cells.append(f"{abs_:.1e} / {rel:.1e}")
            else:
                cells.append("")
        print(f"| {level} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
