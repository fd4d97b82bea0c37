"""Speculative decoding in the batching engine and the server (tinylm/inference/spec_engine.py): every
request's greedy output equals the engine without a draft (concurrent rows of different lengths, text
deltas included), sampled output follows the target's distribution (chi-square), through the official
`openai` client too."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from test_generate import tiny_model
from test_mla import tiny_tokenizer
from test_speculative import chisquare_pvalue, make

from tinylm.inference.engine import Engine
from tinylm.inference.generate import BatchGenerator, SamplingParams
from tinylm.inference.spec_engine import SpecBatchGenerator
from tinylm.inference.speculative import distribution

PROMPTS = [[5, 9, 17, 33], [7] * 11, [40, 41], [3, 8, 13, 21, 34, 55, 89, 1, 4], [60, 61, 62]]


def run(gen, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str, str, str]]:
    """All requests through one generator (rows shared); per request: ids, joined deltas, content, finish."""
    out, seqs = [], []
    for ids, sp in requests:
        deltas: list = []
        seqs.append((gen.new_sequence(ids, sp, on_delta=deltas.append), deltas))
        gen.add(seqs[-1][0])
    while gen.has_work():
        gen.step()
    for s, deltas in seqs:
        assert sum(d.finish_reason is not None for d in deltas) == 1 and deltas[-1].finish_reason == s.finish_reason
        out.append((s.output_ids, "".join(d.content for d in deltas), s.content, s.finish_reason))
    return out


def requests() -> list[tuple[list[int], SamplingParams]]:
    g = dict(temperature=0, ignore_eos=True)
    return [(PROMPTS[0], SamplingParams(max_new_tokens=20, **g)), (PROMPTS[1], SamplingParams(max_new_tokens=7, **g)),
            (PROMPTS[2], SamplingParams(max_new_tokens=30, **g)),  # runs into the end of the 32-token context
            (PROMPTS[3], SamplingParams(max_new_tokens=12, repetition_penalty=1.3, **g)),  # no speculation
            (PROMPTS[4], SamplingParams(max_new_tokens=1, **g))]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_greedy_equals_engine_without_draft(max_batch):
    """Batch 1 (speculation with one running row) and 3 rows for 5 requests (rows freed and re-used
    mid-run, rows proposing different numbers of tokens in one verification)."""
    tok = tiny_tokenizer()
    # Untied random models (tied tiny ones just repeat the last token, which any draft guesses); the
    # draft is the target plus noise, accepted about a third of the time (rollbacks of every length).
    target, near = make(0, tie_word_embeddings=False), make(0, tie_word_embeddings=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * 0.005)
    cases = [(target, near, 3), (target, make(2, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=2), 2),
             (target, target, 4), (make(3, mtp_depth=1, tie_word_embeddings=False), "mtp", 1),
             (make(4, mtp_depth=2, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=16, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   tie_word_embeddings=False),
              "mtp", 1)]  # an MLA + MoE target (latent cache rolled back)
    sampled = (PROMPTS[0], SamplingParams(max_new_tokens=15, temperature=1.0, seed=3))  # shares the batch
    for model, draft, k in cases:
        plain = run(BatchGenerator(model, tok, max_batch=max_batch, max_seq_len=32), requests() + [sampled])[:-1]
        gen = SpecBatchGenerator(model, tok, draft, k, max_batch=max_batch, max_seq_len=32)
        assert run(gen, requests() + [sampled])[:-1] == plain
        assert plain[2][3] == "length" and len(plain[2][0]) == 32 - len(PROMPTS[2])
        assert all(text == content for _, text, content, _ in plain) and plain[0][1]
        st = gen.spec_stats()
        assert st["proposed"] > 0 and 0 <= st["accepted"] <= st["proposed"] and st["tokens_per_row_forward"] >= 1
        if draft is near:
            assert 0.1 < st["acceptance_rate"] < 0.9
        if draft is target:  # a perfect draft: every draft accepted
            assert st["acceptance_rate"] == 1.0 and st["tokens_per_row_forward"] > 2


def sampled_second_tokens(gen, prompt: list[int], sp: SamplingParams, n: int) -> torch.Tensor:
    counts = torch.zeros(16)
    seqs = [gen.new_sequence(prompt, SamplingParams(**{**sp.__dict__, "seed": i})) for i in range(n)]
    for s in seqs:
        gen.add(s)
    while gen.has_work():
        gen.step()
    for s in seqs:
        counts[s.output_ids[1]] += 1
    return counts


@pytest.mark.parametrize("draft", ["model", "mtp"])
def test_sampling_preserves_target_distribution(draft):
    """8 rows at a time, per-request seeds: the 2nd token (the first verified one) is distributed as
    sum_a p(a | prompt) p(b | prompt, a), computed exactly from a peaked 16-token target."""
    tok = tiny_tokenizer()
    target = make(6, vocab=16, mtp_depth=1)
    d = make(5, vocab=16, num_hidden_layers=1) if draft == "model" else "mtp"
    with torch.no_grad():  # a peaked target (max 0.27, 16 bins with >= 5 expected); the draft stays near uniform
        target.lm_head.weight.mul_(5)
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, ignore_eos=True)
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = distribution(target(torch.tensor([prompt])).logits[0, -1], sp)
        p2 = distribution(target(torch.tensor([prompt + [a] for a in range(16)])).logits[:, -1], sp)
    expected, n = p1 @ p2, 400
    gen = SpecBatchGenerator(target, tok, d, 3, max_batch=8, max_seq_len=16)
    counts = sampled_second_tokens(gen, prompt, sp, n)
    assert gen.stats.proposed >= n and 0 < gen.stats.accepted < gen.stats.proposed  # drafts were judged, some rejected
    keep = expected * n >= 5  # chi-square needs expected counts >= 5: pool the rare tokens
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double() * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chisquare_pvalue(obs, exp * obs.sum() / exp.sum()) > 1e-3
    assert expected.max() > 0.2  # a peaked target: the test has power
    assert chisquare_pvalue(counts, torch.full((16,), n / 16)) < 1e-6  # and it can fail: uniform is rejected


def test_errors():
    from tinylm.inference import fast_decode

    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="draft vocab_size 16 != target vocab_size 96"):
        SpecBatchGenerator(make(0), tok, make(1, vocab=16))
    with pytest.raises(ValueError, match="no MTP modules"):
        SpecBatchGenerator(make(0), tok, "mtp")
    model = make(0)
    fast_decode.set_quantization(model, "int8")
    with pytest.raises(ValueError, match="int8 cannot be combined"):
        SpecBatchGenerator(model, tok, make(1))


def test_server_with_draft_openai_client():
    """`tinylm serve --draft`: concurrent streamed chat requests of different lengths get the text of
    the server without a draft; /health reports acceptance and tokens per forward."""
    openai = pytest.importorskip("openai")
    from tinylm.cli import build_parser
    from tinylm.serving.server import BackgroundServer, create_app
    from tinylm.text.tokenizer import load_tokenizer

    args = build_parser().parse_args(["serve", "some/dir", "--draft", "mtp", "--draft-k", "3"])
    assert args.draft == "mtp" and args.draft_k == 3
    tok = load_tokenizer()
    model, draft = tiny_model(len(tok), tie_word_embeddings=False), tiny_model(len(tok), tie_word_embeddings=False)
    torch.manual_seed(1)
    with torch.no_grad():  # a draft that agrees with the target part of the time
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.005)
    questions = ["Tell me a story about a cat.", "你好", "What is 2 + 2?", "Hi"]
    lengths = [24, 9, 17, 5]

    def ask_all(engine) -> tuple[list[str], dict]:
        out = [""] * len(questions)
        with BackgroundServer(create_app(engine.start(), "tiny")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)

            def ask(i: int) -> None:
                for chunk in client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": questions[i]}], max_tokens=lengths[i],
                        temperature=0, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        out[i] += chunk.choices[0].delta.content

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            health = httpx.get(srv.url + "/health").json()
        engine.stop()
        return out, health

    plain, h_plain = ask_all(Engine(model, tok, max_batch=3))
    spec, h_spec = ask_all(Engine(model, tok, max_batch=3, draft=draft, draft_k=3))
    assert spec == plain and all(plain) and len(set(plain)) == len(plain)
    assert "speculative" not in h_plain
    st = h_spec["speculative"]
    assert st["k"] == 3 and 0 < st["accepted"] < st["proposed"] and st["verify_forwards"] > 0 and st["tokens_per_row_forward"] >= 1
