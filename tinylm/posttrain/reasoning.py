"""Reasoning ("think, then answer") chat format and its tag-weighted SFT loss.

A reasoning model answers in two parts, as DeepSeek-R1 (2025) made popular:

    <think>
    ...chain of thought...
    </think>
    <answer>
    ...final answer...
    </answer>

A model learns the structure quickly if the tag positions matter more in the loss. MiniMind's
reasoning distillation multiplies the loss on the tag tokens by 10; `tag_weighted_loss` does the
same with a configurable weight (`tag_weight`, 10 by default, 1 = plain SFT). The four tags are
single special tokens of the bundled tokenizer (ids 3..6): then a token-id test is enough. Other
tokenizers split them (SmolLM2: `<think>` = `<`, `think`, `>`, and BPE merges may glue a tag's
`>` to the next newline), so `TagSpans` finds the tags in the decoded text and weights every
token that overlaps a tag - the same rule for any tokenizer.

At inference the user may want to see the thinking or only the answer: `split_thinking` parses a
completion into `(reasoning, answer)` and tolerates a missing or unfinished block, so a chat UI
can hide or fold the reasoning. `is_well_formed` is the strict check used by tests and by the
GRPO format reward.
"""

from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F

from tinylm.training.objectives import SFTObjective, lm_inputs

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Exactly one think block followed by exactly one answer block (whitespace around them allowed).
_WELL_FORMED = re.compile(
    r"^\s*<think>(?P<think>(?:(?!<think>|</think>|<answer>|</answer>).)*)</think>\s*"
    r"<answer>(?P<answer>(?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*$",
    re.DOTALL,
)


def format_reasoning(reasoning: str, answer: str) -> str:
    """The assistant text for one reasoning turn (the format of data/posttrain/reason.jsonl)."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{answer.strip()}\n{ANSWER_CLOSE}"


def is_well_formed(text: str) -> bool:
    """True when `text` is exactly one <think>...</think> then one <answer>...</answer>, both non-empty."""
    m = _WELL_FORMED.match(text)
    return bool(m and m.group("think").strip() and m.group("answer").strip())


def split_thinking(text: str) -> tuple[str, str]:
    """Split a completion into (reasoning, answer), both stripped.

    - `<think>R</think><answer>A</answer>` -> (R, A)
    - `<think>R</think> A` (no answer tags)  -> (R, A)
    - `<think>R` (generation stopped while thinking) -> (R, "")
    - text without any tag -> ("", text)
    The inference helper shows `answer` only, or both when the user asks to see the thinking.
    """
    reasoning, rest = "", text
    if THINK_CLOSE in text:  # also covers prompts that already opened <think> (Qwen3 style)
        head, _, rest = text.partition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[-1]
    elif THINK_OPEN in text:  # generation stopped while thinking
        before, _, after = text.partition(THINK_OPEN)
        return after.strip(), before.strip()
    if ANSWER_OPEN in rest:
        rest = rest.split(ANSWER_OPEN, 1)[1]
        rest = rest.split(ANSWER_CLOSE, 1)[0]
    else:
        rest = rest.replace(ANSWER_CLOSE, "")
    return reasoning.strip(), rest.strip()


def tag_token_ids(tokenizer) -> list[int] | None:
    """Ids of the four reasoning tags when each is ONE token of `tokenizer` (the bundled tokenizer), else None."""
    ids = []
    for tag in TAGS:
        enc = tokenizer.encode(tag, add_special_tokens=False)
        if len(enc) != 1:
            return None
        ids.append(enc[0])
    return ids


class TagSpans:
    """Marks every token that overlaps a reasoning tag, for tokenizers where tags are several tokens.

    Each token id is decoded once on its own (cached); a row's pieces are concatenated, the tags
    are searched in that string, and a token is marked when its characters overlap a tag. The
    search runs on the concatenated pieces themselves, so the character -> token map is exact even
    where a piece is not valid text alone (a split UTF-8 character decodes to U+FFFD). Equivalent
    to the tokenizer's offset mapping on the original text (tests/test_reasoning.py), but works on
    the token ids the data pipeline caches, which carry no offsets.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pieces: dict[int, str] = {}

    def _piece(self, i: int) -> str:
        p = self.pieces.get(i)
        if p is None:
            p = self.pieces[i] = self.tokenizer.decode([i], skip_special_tokens=False,
                                                       clean_up_tokenization_spaces=False)
        return p

    def mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> bool (B, T): True on every token overlapping <think>, </think>, <answer>, </answer>."""
        import bisect

        rows = input_ids.tolist()
        out = torch.zeros(len(rows), len(rows[0]) if rows else 0, dtype=torch.bool)
        for b, row in enumerate(rows):
            pieces = [self._piece(t) for t in row]
            starts, pos = [], 0
            for p in pieces:
                starts.append(pos)
                pos += len(p)
            text = "".join(pieces)
            for tag in TAGS:
                i = text.find(tag)
                while i >= 0:
                    first = bisect.bisect_right(starts, i) - 1             # token holding the tag's first char
                    last = bisect.bisect_right(starts, i + len(tag) - 1) - 1  # ... and its last char
                    out[b, first:last + 1] = True
                    i = text.find(tag, i + len(tag))
        return out.to(input_ids.device)


def tag_weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, tag_ids: list[int] | torch.Tensor | None = None,
    tag_weight: float = 10.0, tag_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Next-token CE where targets that are reasoning-tag tokens count `tag_weight` times.

    logits (B, T, V), labels (B, T) with -100 for unsupervised positions (unshifted, HF convention).
    The tag tokens are given either as `tag_ids` (single-token tags) or as `tag_mask` (B, T) bool,
    aligned with labels (True on every token of a tag span, see `TagSpans`).
    Returns (loss_sum, n_tokens): the weighted sum over supervised targets and their count, so
    loss_sum / n_tokens equals plain mean CE when tag_weight == 1.
    """
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V)
    targets = labels[:, 1:]                               # (B, T-1)
    valid = targets != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                         ignore_index=-100, reduction="none").view_as(targets)  # (B, T-1)
    if tag_mask is not None:
        is_tag = tag_mask[:, 1:].to(targets.device)
    elif tag_ids is not None:
        is_tag = torch.isin(targets, torch.as_tensor(tag_ids, device=targets.device))
    else:
        raise ValueError("tag_weighted_loss needs tag_ids or tag_mask")
    w = torch.where(is_tag, float(tag_weight), 1.0) * valid  # (B, T-1)
    return (ce * w).sum(), int(valid.sum())


class ReasonObjective(SFTObjective):
    """Stage `reason`: SFT on think/answer chats with the tag tokens weighted `reason.tag_weight` times.

    Works with any tokenizer: single-token tags are found by id, multi-token ones by `TagSpans`.
    """

    def setup(self, model, tokenizer, cfg, device) -> None:
        super().setup(model, tokenizer, cfg, device)
        self.tag_weight = float(cfg.reason.tag_weight)
        if self.tag_weight < 0:
            raise ValueError(f"config: reason.tag_weight must be >= 0, got {self.tag_weight}")
        self.tag_ids = tag_token_ids(tokenizer)  # fast path: one token per tag (bundled tokenizer)
        self.tag_spans = None if self.tag_ids is not None else TagSpans(tokenizer)
        allow = cfg.data.allow_special_tokens
        if self.tag_ids is not None and allow is not True and not {ANSWER_OPEN, ANSWER_CLOSE} <= set(allow or []):
            print(f"warning: stage reason: {ANSWER_OPEN}/{ANSWER_CLOSE} written in the data are encoded as plain "
                  "text, so they are not the tag tokens this stage weights; for trusted think/answer data set "
                  f'data.allow_special_tokens: ["{ANSWER_OPEN}", "{ANSWER_CLOSE}"] (as recipes/reason.yaml does)',
                  file=sys.stderr)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        out = model(**lm_inputs(model, batch), use_cache=False)
        if self.tag_spans is not None:
            loss_sum, n = tag_weighted_loss(out.logits, batch["labels"], tag_weight=self.tag_weight,
                                            tag_mask=self.tag_spans.mask(batch["input_ids"]))
        else:
            loss_sum, n = tag_weighted_loss(out.logits, batch["labels"], self.tag_ids, self.tag_weight)
        aux = getattr(out, "aux_loss", None)
        if aux is not None and aux.requires_grad:
            loss_sum = loss_sum + aux * n
        return loss_sum, n, {}
