"""Tokenisation of records into fixed-shape int32 arrays, with every truncation counted.

Layouts (pad = tokenizer.pad_token_id, eoc = end-of-conversation ids):

- prompt:   [pad ... pad, prompt]           length P, left-padded; a long prompt loses its
                                             beginning (the end, next to the answer, is kept)
- response: [response, eoc, pad ... pad]     length A, right-padded; a long one loses its end
- sequence: [prompt, response, eoc, pad...]  length L (SFT and reward model), right-padded; the
                                             prompt is cut as above to at most min(P, L - 1)
                                             tokens, then the response from the right to fit

Prompt and response are tokenised separately and concatenated, so reward-model and SFT
sequences hold exactly the token boundary PPO produces when it generates after a prompt. The
prompt is tokenised with the tokenizer's special tokens (e.g. a BOS), the response without.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from shared.data.batches import PairwiseBatch, PromptBatch, RankingBatch, SFTBatch, TextBatch
from shared.data.records import (
    DataError,
    DataReport,
    PairwiseExample,
    PromptExample,
    RankingExample,
    SFTExample,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROGRESS_MIN_TEXTS = 20_000
"""Tokenising at least this many distinct texts shows a tqdm progress bar."""

_CHUNK = 1_000


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, pad_with_eos: bool = False
) -> PreTrainedTokenizerBase:
    """Gives the tokenizer the pad token the run needs, in place; returns it.

    Without `pad_with_eos`, only a tokenizer without a pad token gets one, with a warning: the
    eos token when there is one (attention masks keep them apart); otherwise a new `<pad>`
    token is added and the model's embeddings must be resized to `len(tokenizer)`.

    `pad_with_eos=True` (`data.pad_with_eos`) makes the eos token the pad token whatever pad
    the tokenizer has, as DeepSpeed-Chat does for every model whose name does not contain
    "llama" (dschat/utils/utils.py `get_tokenizer`: `tokenizer.pad_token =
    tokenizer.eos_token`). For OPT, whose BOS is its EOS `</s>`, every sequence then starts
    with one pad token: the one `num_padding_at_beginning: 1` skips. Idempotent. Apply it where
    the tokenizer is loaded, before any model or batch reads its pad id.
    """
    if pad_with_eos:
        if tokenizer.eos_token is None:
            raise DataError("data.pad_with_eos is true but the tokenizer has no eos token")
        tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            message = (
                f"tokenizer has no pad token; using its eos token {tokenizer.eos_token!r} "
                f"(id {tokenizer.pad_token_id}) as pad"
            )
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            message = (
                f"tokenizer has neither a pad nor an eos token; added '<pad>' (id "
                f"{tokenizer.pad_token_id}): resize the model's embeddings to {len(tokenizer)}"
            )
        warnings.warn(message, stacklevel=2)
    return tokenizer


def check_pad_with_eos(tokenizer: PreTrainedTokenizerBase, pad_with_eos: bool) -> None:
    """Raises a DataError when `data.pad_with_eos` is set but the tokenizer's pad is not its
    eos: it was loaded without `prepare_tokenizer(tokenizer, pad_with_eos=True)`, and the
    models may already hold the other pad id."""
    if pad_with_eos and tokenizer.pad_token_id != tokenizer.eos_token_id:
        raise DataError(
            f"data.pad_with_eos is true but the tokenizer pads with {tokenizer.pad_token!r} "
            f"(id {tokenizer.pad_token_id}), not its eos {tokenizer.eos_token!r} (id "
            f"{tokenizer.eos_token_id}): load it through prepare_tokenizer(tokenizer, "
            "pad_with_eos=True) before the models and batches read its pad id"
        )


PADDING_PROBE = "Human: hello"
"""The text `padding_at_beginning` tokenises (any text whose own tokens are not the pad)."""


def padding_at_beginning(tokenizer: PreTrainedTokenizerBase, text: str = PADDING_PROBE) -> int:
    """How many pad tokens the tokenizer puts before a text it encodes with its special tokens
    (how prompts, and so reward-model sequences, begin). OPT with pad = eos: 1 (its BOS
    `</s>`); OPT with its own `<pad>`, Llama, GPT-2: 0."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    pad = tokenizer.pad_token_id
    count = 0
    while count < len(ids) and ids[count] == pad:
        count += 1
    return count


def check_padding_at_beginning(
    tokenizer: PreTrainedTokenizerBase, num_padding_at_beginning: int
) -> None:
    """Raises a DataError unless every sequence the tokenizer encodes starts with exactly
    `num_padding_at_beginning` pad tokens.

    DeepSpeed-Chat's reward model (reward_model.py `RewardModel.forward`) takes a sequence's
    end at its (k+1)-th pad token, k = num_padding_at_beginning: with fewer pads at the
    beginning the end is found k - n tokens too late (the OPT recipes' k = 1 with OPT's own
    `<pad>`), with more the end is the beginning. Call it when the reward step starts.
    """
    k = num_padding_at_beginning
    found = padding_at_beginning(tokenizer)
    if found == k:
        return
    ids = tokenizer(PADDING_PROBE, add_special_tokens=True)["input_ids"][: max(k, found) + 2]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    hint = (
        f"set data.num_padding_at_beginning: {found}"
        if found > k
        else f"set data.num_padding_at_beginning: {found}, or data.pad_with_eos: true when "
        "the tokenizer's BOS is its EOS, as DeepSpeed-Chat pads OPT (its BOS `</s>` is then "
        "the pad at the beginning)"
    )
    raise DataError(
        f"data.num_padding_at_beginning = {k}, but the tokenizer puts {found} pad token(s) "
        f"(pad {tokenizer.pad_token!r}, id {tokenizer.pad_token_id}) before every sequence: "
        f"{PADDING_PROBE!r} begins {ids} {tokens}. The reward model would take each "
        f"sequence's end at its pad number {k + 1}, "
        + ("past the real end" if found < k else "inside the padding at the beginning")
        + f"; {hint}"
    )


def end_of_conversation_ids(tokenizer: PreTrainedTokenizerBase, token: str | None) -> list[int]:
    """Ids appended to every response: `token` (default: the eos token) as one vocabulary
    entry when it is one, else its tokenisation."""
    if token is None:
        token = tokenizer.eos_token
        if token is None:
            raise DataError("tokenizer has no eos token; set DataConfig.end_of_conversation_token")
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return [int(vocab[token])]
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"end_of_conversation_token {token!r} tokenises to nothing")
    return [int(i) for i in ids]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides token ids: vocabulary, merges, special tokens, post-processor."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(getattr(tokenizer, "add_bos_token", None)).encode())
    specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token]
    h.update(json.dumps([str(s) for s in specials]).encode())
    return h.hexdigest()


def token_lists(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    add_special_tokens: bool,
    desc: str = "tokenising",
) -> list[list[int]]:
    """Token ids of each text (no padding or truncation); each distinct text is tokenised once."""
    unique = list(dict.fromkeys(texts))
    ids: dict[str, list[int]] = {}
    chunks = range(0, len(unique), _CHUNK)
    for start in tqdm(chunks, desc=desc, unit="chunk", disable=len(unique) < PROGRESS_MIN_TEXTS):
        part = unique[start : start + _CHUNK]
        encoded = tokenizer(part, add_special_tokens=add_special_tokens, verbose=False)
        ids.update(zip(part, encoded["input_ids"], strict=True))
    return [ids[text] for text in texts]


def unknown_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id text outside the vocabulary becomes, or None when there is no such token or it
    doubles as the eos, bos or pad token (GPT-2's `<|endoftext|>`), so counting it would
    count those."""
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    return None if unk is None or unk in specials else int(unk)


def count_unknown(
    tokenizer: PreTrainedTokenizerBase,
    seqs: Sequence[Sequence[int]],
    report: DataReport,
    scope: str,
) -> None:
    """Adds `<scope>/text_tokens` (every token of `seqs`, before truncation) and
    `<scope>/unk_tokens` (those that are `unknown_token_id`) to the report."""
    report.add(f"{scope}/text_tokens", sum(len(seq) for seq in seqs))
    unk = unknown_token_id(tokenizer)
    if unk is not None:
        report.add(f"{scope}/unk_tokens", sum(list(seq).count(unk) for seq in seqs))


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """[N, length] ids and mask with each sequence at the right end; longer ones keep their end."""
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, seq in enumerate(seqs):
        seq = list(seq)[-length:] if seq else []
        if seq:
            ids[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """[N, length] ids and mask with each sequence at the left end; longer ones keep their start."""
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, seq in enumerate(seqs):
        seq = list(seq)[:length]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_prompt_seq_len: int,
    report: DataReport,
    scope: str = "ppo",
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and mask, [N, P]; prompts longer than P lose their beginning
    (counted as `<scope>/prompt_truncated`, and `<scope>/truncated_rows` of `<scope>/rows`;
    unknown tokens as in `count_unknown`)."""
    seqs = token_lists(tokenizer, prompts, add_special_tokens=True, desc=f"{scope} prompts")
    truncated = sum(len(s) > max_prompt_seq_len for s in seqs)
    report.add(f"{scope}/prompt_truncated", truncated)
    report.add(f"{scope}/truncated_rows", truncated)
    report.add(f"{scope}/rows", len(seqs))
    count_unknown(tokenizer, seqs, report, scope)
    return pad_left(seqs, max_prompt_seq_len, tokenizer.pad_token_id)


def encode_responses(
    tokenizer: PreTrainedTokenizerBase,
    responses: Sequence[str],
    *,
    max_answer_seq_len: int,
    eoc_ids: Sequence[int],
    report: DataReport,
    scope: str = "ppo",
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded response + eoc ids and mask, [N, A], the layout of PPO answers; longer
    ones lose their end (counted as `<scope>/response_truncated`)."""
    seqs = token_lists(tokenizer, responses, add_special_tokens=False, desc=f"{scope} responses")
    seqs = [s + list(eoc_ids) for s in seqs]
    report.add(f"{scope}/response_truncated", sum(len(s) > max_answer_seq_len for s in seqs))
    return pad_right(seqs, max_answer_seq_len, tokenizer.pad_token_id)


class _SequenceEncoder:
    """Builds prompt + response + eoc sequences of length L, counting truncations (per
    sequence, and per example in `finish`) and unknown tokens."""

    def __init__(self, tokenizer, *, max_seq_len, max_prompt_seq_len, eoc_ids, report, scope):
        self.tokenizer = tokenizer
        self.length = max_seq_len
        self.prompt_cap = min(max_prompt_seq_len, max_seq_len - 1)
        self.eoc = list(eoc_ids)
        self.report = report
        self.scope = scope
        self.truncated: set[int] = set()  # examples that lost a token anywhere

    def prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        seqs = token_lists(
            self.tokenizer, prompts, add_special_tokens=True, desc=f"{self.scope} prompts"
        )
        count_unknown(self.tokenizer, seqs, self.report, self.scope)
        cut = [i for i, s in enumerate(seqs) if len(s) > self.prompt_cap]
        self.report.add(f"{self.scope}/prompt_truncated", len(cut))
        self.truncated.update(cut)
        return [s[-self.prompt_cap :] if len(s) > self.prompt_cap else s for s in seqs]

    def join(
        self,
        prompts: list[list[int]],
        responses: Sequence[str],
        owners: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Concatenates each prompt with its response + eoc, cutting the response to fit L;
        `owners[i]` is the example sequence i belongs to (default: i)."""
        seqs = token_lists(
            self.tokenizer, responses, add_special_tokens=False, desc=f"{self.scope} responses"
        )
        count_unknown(self.tokenizer, seqs, self.report, self.scope)
        owners = range(len(seqs)) if owners is None else owners
        joined = []
        for p, r, owner in zip(prompts, seqs, owners, strict=True):
            full = p + r + self.eoc
            if len(full) > self.length:
                self.report.add(f"{self.scope}/response_truncated")
                self.truncated.add(owner)
            joined.append(full[: self.length])
        return joined

    def finish(self, rows: int) -> None:
        """Counts `<scope>/truncated_rows` (examples with any part cut) of `<scope>/rows`."""
        self.report.add(f"{self.scope}/truncated_rows", len(self.truncated))
        self.report.add(f"{self.scope}/rows", rows)

    def pad(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_right(seqs, self.length, self.tokenizer.pad_token_id)


def encode_sft(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SFTExample],
    *,
    max_seq_len: int,
    max_prompt_seq_len: int,
    eoc_ids: Sequence[int],
    train_on_prompt: bool,
    report: DataReport,
) -> SFTBatch:
    """SFT sequences [N, L]; loss_mask covers response + eoc (and the prompt if asked)."""
    enc = _SequenceEncoder(
        tokenizer,
        max_seq_len=max_seq_len,
        max_prompt_seq_len=max_prompt_seq_len,
        eoc_ids=eoc_ids,
        report=report,
        scope="sft",
    )
    prompts = enc.prompts([e.prompt for e in examples])
    seqs = enc.join(prompts, [e.response for e in examples])
    enc.finish(len(examples))
    ids, mask = enc.pad(seqs)
    loss_mask = mask.copy()
    if not train_on_prompt:
        for i, p in enumerate(prompts):
            loss_mask[i, : len(p)] = 0
    return SFTBatch(ids, mask, loss_mask)


def encode_pairwise(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PairwiseExample],
    *,
    max_seq_len: int,
    max_prompt_seq_len: int,
    eoc_ids: Sequence[int],
    report: DataReport,
) -> PairwiseBatch:
    """Chosen and rejected sequences [N, L] sharing each (identically truncated) prompt,
    whose lengths are `prompt_lengths`."""
    enc = _SequenceEncoder(
        tokenizer,
        max_seq_len=max_seq_len,
        max_prompt_seq_len=max_prompt_seq_len,
        eoc_ids=eoc_ids,
        report=report,
        scope="reward",
    )
    prompts = enc.prompts([e.prompt for e in examples])
    chosen = enc.pad(enc.join(prompts, [e.chosen for e in examples]))
    rejected = enc.pad(enc.join(prompts, [e.rejected for e in examples]))
    enc.finish(len(examples))
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    return PairwiseBatch(chosen[0], chosen[1], rejected[0], rejected[1], lengths)


def encode_ranking(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[RankingExample | PairwiseExample],
    *,
    max_seq_len: int,
    max_prompt_seq_len: int,
    eoc_ids: Sequence[int],
    report: DataReport,
) -> RankingBatch:
    """Rankings [N, K, L], K the largest ranking; comparisons become rankings of two."""
    rankings = [
        (e.prompt, (e.chosen, e.rejected))
        if isinstance(e, PairwiseExample)
        else (e.prompt, e.responses)
        for e in examples
    ]
    k_max = max(len(r) for _, r in rankings)
    enc = _SequenceEncoder(
        tokenizer,
        max_seq_len=max_seq_len,
        max_prompt_seq_len=max_prompt_seq_len,
        eoc_ids=eoc_ids,
        report=report,
        scope="reward",
    )
    prompts = enc.prompts([p for p, _ in rankings])
    flat_prompts = [p for p, (_, r) in zip(prompts, rankings, strict=True) for _ in r]
    owners = [i for i, (_, r) in enumerate(rankings) for _ in r]
    flat = enc.pad(enc.join(flat_prompts, [resp for _, r in rankings for resp in r], owners))
    enc.finish(len(rankings))
    ids = np.full((len(rankings), k_max, max_seq_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(rankings), k_max, max_seq_len), dtype=np.int32)
    num_valid = np.array([len(r) for _, r in rankings], dtype=np.int32)
    row = 0
    for i, k in enumerate(num_valid):
        ids[i, :k] = flat[0][row : row + k]
        mask[i, :k] = flat[1][row : row + k]
        row += k
    return RankingBatch(ids, mask, num_valid)


def encode_prompt_batch(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PromptExample],
    *,
    max_prompt_seq_len: int,
    report: DataReport,
) -> PromptBatch:
    """PPO prompts [N, P]; prompts with no tokens at all are dropped (`ppo/empty_prompt`)."""
    ids, mask = encode_prompts(
        tokenizer,
        [e.prompt for e in examples],
        max_prompt_seq_len=max_prompt_seq_len,
        report=report,
    )
    keep = mask.sum(axis=1) > 0
    report.add("ppo/empty_prompt", int((~keep).sum()))
    kept = [e for e, k in zip(examples, keep, strict=True) if k]
    reference = None
    if any(e.reference is not None for e in kept):
        reference = np.array([e.reference or "" for e in kept], dtype=str)
    prompt_text = np.array([e.prompt for e in kept], dtype=str)
    return PromptBatch(ids[keep], mask[keep], prompt_text, reference)


def encode_text_blocks(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    block_len: int,
    eoc_ids: Sequence[int],
    report: DataReport,
) -> TextBatch:
    """ptx blocks [N, block_len]: documents + eoc concatenated and cut into blocks (as
    DeepSpeed-Chat's `group_texts`); the last partial block is right-padded, not dropped."""
    stream: list[int] = []
    seqs = token_lists(tokenizer, texts, add_special_tokens=False, desc="ptx")
    count_unknown(tokenizer, seqs, report, "ptx")
    for ids in seqs:
        stream.extend(ids)
        stream.extend(eoc_ids)
    n_blocks = -(-len(stream) // block_len)
    blocks = [stream[i * block_len : (i + 1) * block_len] for i in range(n_blocks)]
    report.add("ptx/documents", len(texts))
    report.add("ptx/blocks", n_blocks)
    report.add("ptx/padding_tokens", n_blocks * block_len - len(stream))
    ids, mask = pad_right(blocks, block_len, tokenizer.pad_token_id)
    return TextBatch(ids, mask)
