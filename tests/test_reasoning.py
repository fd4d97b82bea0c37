"""Reasoning format helpers and the tag-weighted loss."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.reasoning import format_reasoning, is_well_formed, split_thinking, tag_weighted_loss


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

    from tinylm.chat_format import encode_chat, render_prompt
    from tinylm.config import TinyLMConfig
    from tinylm.grpo import sample
    from tinylm.model import TinyLMForCausalLM
    from tinylm.reasoning import ReasonObjective
    from tinylm.tokenizer import load_tokenizer
    from tinylm.trainconfig import TrainConfig

    torch.manual_seed(0)
    tok = load_tokenizer()
    path = Path(__file__).resolve().parents[1] / "data" / "posttrain" / "reason.jsonl"
    convs = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    enc = [encode_chat(tok, m) for m in convs]
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
