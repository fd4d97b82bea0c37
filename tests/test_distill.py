"""Distillation loss vs a hand computation and torch.nn.functional.kl_div; vocab mismatch errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.posttrain.distill import check_same_vocab, distill_loss


def _data(seed=0, V=11):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 6, V, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :3] = -100
    labels[1, 4] = -100
    return s, t, labels


@pytest.mark.parametrize("alpha,T", [(0.5, 1.0), (0.0, 2.0), (1.0, 1.0), (0.3, 4.0)])
def test_matches_hand_computation(alpha, T):
    s, t, labels = _data()
    loss_sum, n, _ = distill_loss(s, t, labels, alpha=alpha, temperature=T)
    want, count = 0.0, 0
    for b in range(2):
        for i in range(5):
            y = labels[b, i + 1].item()
            if y == -100:
                continue
            count += 1
            zs, zt = s[b, i].tolist(), t[b, i].tolist()
            lse = math.log(sum(math.exp(z) for z in zs))
            ce = lse - zs[y]
            ps = [math.exp(z / T) for z in zs]
            pt = [math.exp(z / T) for z in zt]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            kl = sum(q * math.log(q / p) for q, p in zip(pt, ps))
            want += alpha * ce + (1 - alpha) * T * T * kl
    assert n == count
    assert loss_sum.item() == pytest.approx(want, rel=1e-9)


def test_matches_torch_kl_div_and_gradient():
    s, t, labels = _data(1)
    s.requires_grad_()
    T = 2.0
    loss_sum, n, _ = distill_loss(s, t, labels, alpha=0.0, temperature=T)
    (loss_sum / n).backward()
    g1 = s.grad.clone()
    s.grad = None
    valid = labels[:, 1:] != -100
    ls = F.log_softmax(s[:, :-1][valid] / T, -1)
    lt = F.log_softmax(t[:, :-1][valid] / T, -1)
    ref = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * T * T
    ref.backward()
    assert (loss_sum / n).item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(g1, s.grad)


def test_alpha_one_is_plain_cross_entropy():
    s, t, labels = _data(2)
    loss_sum, n, _ = distill_loss(s, t, labels, alpha=1.0)
    ref = F.cross_entropy(s[:, :-1].reshape(-1, s.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert (loss_sum / n).item() == pytest.approx(ref.item(), rel=1e-9)


def test_shape_mismatch_is_clear():
    s, _, labels = _data()
    with pytest.raises(ValueError, match="share the vocabulary"):
        distill_loss(s, torch.zeros(2, 6, 12, dtype=s.dtype), labels)


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_vocab_checks():
    a = _Tok({"a": 0, "b": 1})
    check_same_vocab(a, _Tok({"a": 0, "b": 1}), 8, 8)
    with pytest.raises(ValueError, match="tokenizer mismatch.*2 with different ids"):
        check_same_vocab(a, _Tok({"a": 1, "b": 0, "c": 2}), 8, 8)
    with pytest.raises(ValueError, match="vocab size mismatch"):
        check_same_vocab(a, a, 8, 16)


def _micro(vocab, seed=0):
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, eos_token_id=[2, 0]))


def test_objective_with_teacher_dir_and_mismatch_error(tmp_path):
    from tinylm.posttrain.distill import DistillObjective
    from tinylm.text.tokenizer import load_tokenizer
    from tinylm.training.trainconfig import TrainConfig

    tok = load_tokenizer()
    teacher = _micro(len(tok), seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = TrainConfig(stage="distill", model="tiny")
    cfg.distill.teacher = str(tmp_path / "teacher")
    cfg.distill.temperature = 2.0
    student = _micro(len(tok))
    obj = DistillObjective(cfg)
    obj.setup(student, tok, cfg, torch.device("cpu"))
    ids = torch.randint(10, len(tok), (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    loss_sum, n, m = obj.loss(student, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    want, _, _ = distill_loss(student(ids).logits, teacher(ids).logits, labels, 0.5, 2.0)
    assert n == 16 and loss_sum.item() == pytest.approx(want.item(), rel=1e-5)

    other = load_tokenizer()
    other.add_tokens(["<only-in-teacher>"])
    big = _micro(len(other), seed=2)
    big.save_pretrained(tmp_path / "bad")
    other.save_pretrained(tmp_path / "bad")
    cfg.distill.teacher = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="tokenizer mismatch.*1 only in the teacher"):
        DistillObjective(cfg).setup(student, tok, cfg, torch.device("cpu"))
