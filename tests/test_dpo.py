"""DPO loss, gradients and metrics vs TRL's documented formulas (written independently here)."""

import math

import pytest
import torch

from tinylm.dpo import dpo_loss, preference_metrics, sequence_logps


def _trl_reference(pc, pr, rc, rr, beta, loss_type, ls=0.0, lc=None, lr=None):
    """TRL DPOTrainer: sigmoid = -logsigmoid(beta*delta) (cDPO smoothing as in TRL <= 0.x 'sigmoid'),
    hinge = relu(1 - beta*delta), ipo = (delta_per_token - 1/(2 beta))^2 with length-averaged log-ratios."""
    out = []
    for i in range(len(pc)):
        cl, rl = pc[i] - rc[i], pr[i] - rr[i]
        delta = cl - rl
        if loss_type == "sigmoid":
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            out.append(-(1 - ls) * math.log(sig(beta * delta)) - ls * math.log(sig(-beta * delta)))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * delta))
        else:
            d = cl / lc[i] - rl / lr[i]
            out.append((d - 1 / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                               ("hinge", 0.3, 0.0), ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0)])
def test_loss_and_grad_match_trl_formula(loss_type, beta, ls):
    g = torch.Generator().manual_seed(0)
    pc = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20).requires_grad_()
    pr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20).requires_grad_()
    rc = torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20
    rr = torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20
    lc = torch.randint(1, 30, (6,), generator=g).double()
    lr = torch.randint(1, 30, (6,), generator=g).double()
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls,
                               chosen_lengths=lc, rejected_lengths=lr)
    ref = _trl_reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, ls,
                         lc.tolist(), lr.tolist())
    torch.testing.assert_close(losses, torch.tensor(ref, dtype=torch.float64))
    losses.mean().backward()
    # reference gradient by central finite differences of the independent formula
    h = 1e-6
    for x, name in ((pc, "pc"), (pr, "pr")):
        for i in range(6):
            args = {"pc": pc.tolist(), "pr": pr.tolist()}
            up = [list(args["pc"]), list(args["pr"])]
            dn = [list(args["pc"]), list(args["pr"])]
            k = 0 if name == "pc" else 1
            up[k][i] += h
            dn[k][i] -= h
            f = lambda a: sum(_trl_reference(a[0], a[1], rc.tolist(), rr.tolist(), beta, loss_type, ls,  # noqa: E731
                                             lc.tolist(), lr.tolist())) / 6
            fd = (f(up) - f(dn)) / (2 * h)
            assert abs(x.grad[i].item() - fd) < 1e-5, (name, i, x.grad[i].item(), fd)
    torch.testing.assert_close(cr, beta * (pc - rc).detach())
    torch.testing.assert_close(rjr, beta * (pr - rr).detach())


def test_sigmoid_closed_form_gradient():
    # d/d(pc) of -logsigmoid(beta*d) = -beta * sigmoid(-beta*d)
    pc = torch.tensor([-3.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2)
    losses.sum().backward()
    d = (-3 + 4) - (-5 + 4.5)
    assert abs(pc.grad.item() + 0.2 * torch.sigmoid(torch.tensor(-0.2 * d)).item()) < 1e-6


def test_metrics():
    m = preference_metrics(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)
    assert m["rewards/margins"] == pytest.approx((1 - 1 - 1) / 3)
    assert m["rewards/chosen"] == pytest.approx(2 / 3)


def test_unknown_loss_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")


def test_sequence_logps_matches_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    got = sequence_logps(logits, ids, mask)
    for b in range(2):
        want = 0.0
        for t in range(1, 5):
            if mask[b, t]:
                want += torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
        assert got[b].item() == pytest.approx(want, abs=1e-5)


def _micro(vocab, seed=0):
    from tinylm.config import TinyLMConfig
    from tinylm.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, eos_token_id=[2, 0]))


def test_dpo_objective_learns_preferences(tmp_path):
    import json

    from tinylm.dpo import DPOObjective
    from tinylm.tokenizer import load_tokenizer
    from tinylm.trainconfig import TrainConfig

    tok = load_tokenizer()
    rows = [{"prompt": f"What is {a} + {a}?", "chosen": f"It is {2 * a}.", "rejected": "I do not know, sorry."}
            for a in range(8)]
    rows.append({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                 "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Go away."}]})
    path = tmp_path / "pref.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = TrainConfig(stage="dpo", batch_size=9, seq_len=64)
    cfg.data.train = str(path)
    model = _micro(len(tok))
    obj = DPOObjective(cfg)
    obj.setup(model, tok, cfg, torch.device("cpu"))
    batch = next(obj.batches("train"))
    assert batch["input_ids"].shape[0] == 18
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss_sum, n, m = obj.loss(model, batch)
        first = first or m
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] > 0.5
    ref_w = obj.ref.model.lm_head.weight
    assert not torch.equal(ref_w, model.lm_head.weight) and not ref_w.requires_grad  # reference stays frozen


@pytest.mark.parametrize("row,msg", [
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, msg):
    import json

    from tinylm.dpo import load_pairs
    from tinylm.tokenizer import load_tokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{msg}"):
        load_pairs(str(path), load_tokenizer(), 64)
