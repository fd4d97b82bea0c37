"""ChatML itself (`<|im_start|>role\ncontent<|im_end|>`): its text with the assistant spans, the
check that a tokenizer's template is plain ChatML, and char spans -> token mask.

Below chat_format.py and tool_format.py, which both build on it (chat_format re-exports the names).
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _chatml_text(messages: list[dict], add_generation_prompt: bool,
                 untrusted: list[tuple[int, int]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the (start, end) char spans of each assistant answer incl. <|im_end|>.
    The spans of message text (reasoning, content) are appended to `untrusted` when given."""
    parts, spans, n = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        r, content = m.get("reasoning_content"), m.get("content") or ""
        think = f"<think>\n{r}\n</think>\n" if r else ""
        body = f"{think}{content}{IM_END}"
        start = n + len(head)
        if m["role"] == "assistant":
            spans.append((start, start + len(body)))
        if untrusted is not None:
            if r:
                untrusted.append((start + len("<think>\n"), start + len("<think>\n") + len(r)))
            untrusted.append((start + len(think), start + len(think) + len(content)))
        piece = head + body + "\n"
        parts.append(piece)
        n += len(piece)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def is_chatml(tokenizer) -> bool:
    """True when the tokenizer's template renders plain ChatML (cached on the tokenizer, per template)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_tinylm_is_chatml", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    vocab = tokenizer.get_vocab()
    ok = IM_START in vocab and IM_END in vocab
    if ok and getattr(tokenizer, "chat_template", None):
        probes = [
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        ]
        try:
            for p in probes:
                for gen in (False, True):
                    want = _chatml_text(p, gen)[0]
                    if tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=gen) != want:
                        ok = False
        except Exception:
            ok = False
    try:
        tokenizer._tinylm_is_chatml = (template, ok)
    except Exception:
        pass
    return ok


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask = [0] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            break
        a, b = spans[j]
        if (s < b and e > a) or (s == e and a <= s < b):
            mask[t] = 1
    return mask
