"""Speculative decoding (tinylm/inference/speculative.py): greedy output equals plain decoding, and sampled
output follows the target's distribution (chi-square tests with fixed seeds)."""

from __future__ import annotations

import pytest
import torch
from test_mla import tiny_tokenizer

from tinylm.inference.generate import SamplingParams, generate
from tinylm.inference.speculative import distribution, speculative_generate, verify
from tinylm.models.config import TinyLMConfig
from tinylm.models.model import TinyLMForCausalLM


def chisquare_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value (df = bins - 1): P(chi2_df >= statistic)."""
    observed, expected = observed.double(), expected.double()
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.double), stat / 2))


def make(seed: int, vocab: int = 96, **kw) -> TinyLMForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128, eos_token_id=2, pad_token_id=0)
    return TinyLMForCausalLM(TinyLMConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_plain_decoding(k):
    tok = tiny_tokenizer()
    target = make(0)
    for draft in (make(1, num_hidden_layers=1), make(2, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                                                     qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=2),
                  target):
        sp = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        prompt = [5, 9, 17, 33]
        plain = generate(target, tok, [prompt], sp)[0].token_ids
        seq, stats = speculative_generate(target, draft, tok, prompt, sp, k=k)
        assert seq.output_ids == plain
        assert stats.tokens == 20 and 0 <= stats.accepted <= stats.proposed
        if draft is target:  # a perfect draft: everything accepted, k+1 tokens per forward
            assert stats.acceptance_rate == 1.0


def test_verify_preserves_target_distribution():
    """The first and second emitted tokens follow p0 and p1 for an arbitrary draft q (8-token vocab)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 8, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 8, generator=g) * 1.5, -1)
    q[0, 3] = 0.0  # the draft never proposes token 3: the residual must supply it
    q = q / q.sum(-1, keepdim=True)
    first, second, n = torch.zeros(8), torch.zeros(8), 10000
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = verify(drafts, q, p, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chisquare_pvalue(first, p[0] * n) > 1e-3
    assert chisquare_pvalue(second, p[1] * second.sum()) > 1e-3
    # and the test can fail: a uniform distribution is rejected
    assert chisquare_pvalue(first, torch.full((8,), n / 8)) < 1e-6


def test_sampled_generation_matches_target_distribution():
    """End to end: the 2nd generated token of speculative sampling (tiny models, 16-token vocab) is
    distributed as sum_a p(a | prompt) p(b | prompt, a), computed exactly from the target."""
    tok = tiny_tokenizer()
    target, draft = make(0, vocab=16), make(5, vocab=16, num_hidden_layers=1)
    with torch.no_grad():  # peaked, different distributions (random tiny models are near uniform)
        target.lm_head.weight.mul_(40)
        draft.lm_head.weight.mul_(40)
    sp = SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True)
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = distribution(target(torch.tensor([prompt])).logits[0, -1], sp)
        nxt = torch.tensor([prompt + [a] for a in range(16)])
        p2 = distribution(target(nxt).logits[:, -1], sp)  # (16, 16): row a = p(. | prompt, a)
    expected = p1 @ p2
    counts, n = torch.zeros(16), 600
    for i in range(n):
        seq, _ = speculative_generate(target, draft, tok, prompt, SamplingParams(**{**sp.__dict__, "seed": i}), k=3)
        counts[seq.output_ids[1]] += 1
    keep = expected * n >= 5  # chi-square needs expected counts >= 5: pool the rare tokens
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double() * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chisquare_pvalue(obs, exp * obs.sum() / exp.sum()) > 1e-3
    assert expected.max() > 0.2  # a peaked target: the test has power


def test_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="draft vocab_size 16 != target vocab_size 96"):
        speculative_generate(make(0), make(1, vocab=16), tok, [1, 2], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="penalties"):
        speculative_generate(make(0), make(1), tok, [1, 2], SamplingParams(repetition_penalty=1.2))


def test_mtp_self_speculation_greedy_and_sampled():
    """Self-speculation with the first MTP module: greedy equals plain decoding (also for an MLA
    model); sampling keeps the target's 2nd-token distribution."""
    tok = tiny_tokenizer()
    for target in (make(3, mtp_depth=1), make(4, mtp_depth=2, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                                             qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=2)):
        sp = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
        prompt = [5, 9, 17, 33]
        seq, stats = speculative_generate(target, "mtp", tok, prompt, sp)
        assert seq.output_ids == generate(target, tok, [prompt], sp)[0].token_ids
        assert stats.proposed == stats.target_forwards and stats.tokens == 16
    target = make(6, vocab=16, mtp_depth=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(40)
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True)
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = distribution(target(torch.tensor([prompt])).logits[0, -1], sp)
        p2 = distribution(target(torch.tensor([prompt + [a] for a in range(16)])).logits[:, -1], sp)
    expected, counts, n = p1 @ p2, torch.zeros(16), 400
    for i in range(n):
        seq, _ = speculative_generate(target, "mtp", tok, prompt, SamplingParams(**{**sp.__dict__, "seed": i}))
        counts[seq.output_ids[1]] += 1
    keep = expected * n >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double() * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chisquare_pvalue(obs, exp * obs.sum() / exp.sum()) > 1e-3


def test_cli_generate_with_draft_equals_plain(tmp_path, capsys):
    """`tinylm generate --draft DIR` (and `--draft mtp`) writes the same greedy answers as without."""
    import json

    from tinylm.cli import build_parser
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for name, model in (("target", make(0, vocab=len(tok), mtp_depth=1)), ("draft", make(1, vocab=len(tok)))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hello there"}\n{"prompt": "你好"}\n')

    def run(out: str, *extra: str) -> list:
        args = build_parser().parse_args(["generate", "--model", str(tmp_path / "target"), "--prompts",
                                          str(tmp_path / "p.jsonl"), "--out", str(tmp_path / out),
                                          "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32",
                                          *extra])
        assert args.func(args) == 0
        return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]

    plain = run("plain.jsonl")
    assert run("draft.jsonl", "--draft", str(tmp_path / "draft"), "--draft-k", "3") == plain
    assert run("mtp.jsonl", "--draft", "mtp") == plain
    assert "acceptance" in capsys.readouterr().err
