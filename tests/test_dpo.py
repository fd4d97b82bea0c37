"""DPO loss, gradients and metrics vs TRL's documented formulas (written independently here)."""

import math

import pytest
import torch

from tinylm.posttrain.dpo import dpo_loss, preference_metrics, sequence_logps


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
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, eos_token_id=[2, 0]))


def test_dpo_objective_learns_preferences(tmp_path):
    import json

    from tinylm.posttrain.dpo import DPOObjective
    from tinylm.text.tokenizer import load_tokenizer
    from tinylm.training.trainconfig import TrainConfig

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
    ({"prompt": "q", "chosen": "Yes.", "rejected": " Yes.\n"}, "identical"),  # whitespace is no preference
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, msg):
    import json

    from tinylm.posttrain.dpo import load_pairs
    from tinylm.text.tokenizer import load_tokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{msg}"):
        load_pairs(str(path), load_tokenizer(), 64)


# -- reference model paths: precomputed log-probs, adapters off, ref_model=DIR ------------------------

def _pref_file(path, n=12):
    import json

    rows = [{"prompt": f"What is {a} + {a}?", "chosen": f"It is {2 * a}.", "rejected": "I do not know, sorry."}
            for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _saved_micro(tmp_path, name="base", seed=0):
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = _micro(len(tok), seed=seed)
    model.save_pretrained(str(tmp_path / name))
    tok.save_pretrained(str(tmp_path / name))
    return tmp_path / name


def _dpo_cfg(model_dir, data, out_dir, **kw):
    from tinylm.training.trainconfig import load_config

    over = [f"model={model_dir}", f"data.train={data}", f"out_dir={out_dir}", "stage=dpo", "max_steps=3",
            "batch_size=4", "seq_len=64", "lr=5e-2", "warmup_steps=0", "eval_every=0", "save_every=0",
            "log_every=1", "dtype=fp32", "device=cpu", "seed=3"]
    return load_config(None, over + [f"{k}={v}" for k, v in kw.items()])


def _losses(out_dir):
    import json

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["rewards/margins"] for r in rows if "loss" in r]


def test_precomputed_reference_logps_give_the_live_reference_loss(tmp_path):
    import json

    from tinylm.posttrain.dpo import DPOObjective
    from tinylm.posttrain.dpo import main as dpo_main
    from tinylm.train import train

    base = _saved_micro(tmp_path)
    data = _pref_file(tmp_path / "pref.jsonl")
    pre = tmp_path / "pref_ref.jsonl"
    assert dpo_main(["precompute", "--model", str(base), "--data", str(data), "--out", str(pre),
                     "--seq-len", "64", "--batch-size", "5", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in pre.read_text().splitlines()]
    assert len(rows) == 12 and all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in rows)

    live = DPOObjective(None)
    train(_dpo_cfg(base, data, tmp_path / "live"), objective=live, log=lambda *a: None)
    cached = DPOObjective(None)
    train(_dpo_cfg(base, pre, tmp_path / "cached"), objective=cached, log=lambda *a: None)
    assert live.ref is not None and cached.ref is None  # no reference model loaded
    (l1, m1), (l2, m2) = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert l1[0] == pytest.approx(math.log(2), abs=1e-5) and abs(l1[-1] - l1[0]) > 1e-3  # the policy moved
    assert l2 == pytest.approx(l1, abs=1e-5) and m2 == pytest.approx(m1, abs=1e-5)


def test_precomputed_columns_errors(tmp_path):
    import json

    from tinylm.posttrain.dpo import DPOObjective, load_pairs
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    good = {"prompt": "q", "chosen": "yes", "rejected": "no", "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: no ref_chosen_logps"):
        load_pairs(str(mixed), tok, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**good, "ref_rejected_logps": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'ref_rejected_logps'"):
        load_pairs(str(bad), tok, 64)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(good) + "\n")
    cfg = _dpo_cfg("tiny", ok, tmp_path / "o", **{"dpo.ref_model": str(tmp_path)})
    with pytest.raises(ValueError, match="precomputed"):
        DPOObjective(cfg).setup(_micro(len(tok)), tok, cfg, torch.device("cpu"))


def test_reference_is_base_with_adapters_off_or_ref_model_dir(tmp_path):
    """LoRA policy: pi_ref = the same network with adapters disabled (no copy); dpo.ref_model=DIR: that model."""
    from tinylm.models.lora import apply_lora
    from tinylm.posttrain.dpo import DPOObjective
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    data = _pref_file(tmp_path / "pref.jsonl", 4)
    other = _saved_micro(tmp_path, "other", seed=5)
    base = _micro(len(tok))
    base_logits_model = _micro(len(tok))  # identical weights (same seed), kept untouched
    policy = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():  # non-zero adapters: the policy now differs from the base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    cfg = _dpo_cfg("tiny", data, tmp_path / "o")
    obj = DPOObjective(cfg)
    obj.setup(policy, tok, cfg, torch.device("cpu"))
    assert obj.ref.model is None and obj.ref.adapter_ctx is not None  # no second copy in memory
    batch = next(obj.batches("train"))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = base_logits_model(ids, attention_mask=attn).logits
        assert not torch.allclose(policy(ids, attention_mask=attn).logits, want, atol=1e-3)
    policy.train()
    torch.testing.assert_close(obj.ref(ids, attn), want)
    assert policy.training and all(not m.disabled for n, m in policy.named_modules() if hasattr(m, "disabled"))
    _, _, m = obj.loss(policy, batch)
    assert m["rewards/margins"] != 0.0

    cfg2 = _dpo_cfg("tiny", data, tmp_path / "o2", **{"dpo.ref_model": str(other)})
    obj2 = DPOObjective(cfg2)
    obj2.setup(_micro(len(tok)), tok, cfg2, torch.device("cpu"))
    from tinylm.models.loading import load_model

    ref_model, _ = load_model(str(other))
    with torch.no_grad():
        torch.testing.assert_close(obj2.ref(ids, attn), ref_model(ids, attention_mask=attn).logits)
