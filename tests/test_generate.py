"""Generation: KV-cached decoding vs full forwards and transformers, batching, sampling, streaming text."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tinylm.inference.chat import enable_yarn
from tinylm.inference.generate import (
    BatchGenerator,
    IncrementalDetokenizer,
    SamplingParams,
    StopStringFilter,
    ThinkSplitter,
    apply_frequency_presence,
    apply_repetition_penalty,
    context_length,
    generate,
    sample_token,
    stream,
    top_k_filter,
    top_p_filter,
)
from tinylm.models.hf_compat import CACHE_FIELD, cache_kwargs


@pytest.fixture(scope="module")
def tok():
    from tinylm.text.tokenizer import load_tokenizer

    return load_tokenizer()


def tiny_model(vocab: int, seed: int = 0, **kw):
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    cfg = preset_config("tiny", **{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          eos_token_id=[2, 0]), **kw})
    return TinyLMForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["你好，请介绍一下你自己", "The quick brown fox", "a", "Once upon a time, in a small village by the sea,"]


def full_forward_greedy(model, ids: list[int], n: int) -> list[int]:
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_with_cache_equals_full_forwards_and_transformers(model, tok):
    for p in PROMPTS[:2]:
        ids = tok.encode(p, add_special_tokens=False)
        ours = generate(model, tok, [ids], GREEDY)[0].token_ids
        assert ours == full_forward_greedy(model, ids, 12)
        hf = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == hf


def test_batched_equals_one_by_one(model, tok):
    batched = generate(model, tok, PROMPTS, GREEDY, max_batch=4)
    for p, b in zip(PROMPTS, batched):
        single = generate(model, tok, [p], GREEDY)[0]
        assert b.token_ids == single.token_ids and b.text == single.text
    # Seeded sampling is per request, so it does not depend on the rest of the batch either.
    sp = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    assert [c.token_ids for c in generate(model, tok, PROMPTS[:3], sp)] == \
        [generate(model, tok, [p], sp)[0].token_ids for p in PROMPTS[:3]]


def test_continuous_batching_join_mid_decode(model, tok):
    """A sequence joining while another decodes (and taking a freed row) gets the same tokens."""
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    ref = [generate(model, tok, [i], GREEDY)[0].token_ids for i in ids]
    gen = BatchGenerator(model, tok, max_batch=2)
    short = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    seqs = [gen.new_sequence(ids[0], GREEDY), gen.new_sequence(ids[1], short)]
    gen.add(seqs[0])
    for _ in range(4):
        gen.step()
    for s in seqs[1:]:
        gen.add(s)
    seqs.append(gen.new_sequence(ids[2], GREEDY))  # waits for the row the short one frees
    gen.add(seqs[-1])
    while gen.has_work():
        gen.step()
    assert seqs[0].output_ids == ref[0]
    assert seqs[1].output_ids == ref[1][:3]
    assert seqs[2].output_ids == ref[2]


def test_max_new_tokens_and_context_are_honoured(model, tok):
    for n in (1, 5):
        out = generate(model, tok, PROMPTS, SamplingParams(max_new_tokens=n, temperature=1.0, seed=0, ignore_eos=True))
        assert all(len(c.token_ids) == n and c.finish_reason == "length" for c in out)
    gen = BatchGenerator(model, tok, max_batch=1, max_seq_len=20)
    ids = tok.encode(PROMPTS[3], add_special_tokens=False)
    seq = gen.new_sequence(ids, SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True))
    gen.add(seq)
    while gen.has_work():
        gen.step()
    assert len(ids) + len(seq.output_ids) == 21 and seq.finish_reason == "length"  # last token needs no cache slot


def test_transformers_model_fallback(tok):
    """Any HF causal LM (here Llama) runs through the DynamicCache fallback with identical tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    llama = LlamaForCausalLM(cfg).eval()
    out = generate(llama, tok, PROMPTS[:2], GREEDY)
    for p, c in zip(PROMPTS[:2], out):
        ids = tok.encode(p, add_special_tokens=False)
        hf = llama.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert c.token_ids == hf


# ---------------------------------------------------------------------------------------------
# Sampling, against transformers' logits processors.
# ---------------------------------------------------------------------------------------------
def test_filters_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 3
    for k in (1, 5, 50):
        assert torch.equal(top_k_filter(logits, k).isinf(), TopKLogitsWarper(k)(None, logits.clone()).isinf())
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p).isinf(), TopPLogitsWarper(p)(None, logits.clone()).isinf())
    ids = torch.tensor([[1, 5, 7, 7], [2, 3, 4, 400], [0, 0, 0, 0]])
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_sampling_behaviour():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    assert sample_token(logits, SamplingParams(temperature=0)) == 1
    # Repetition penalty can move the argmax off a repeated token.
    seen = torch.tensor([False, True, False, False, False])
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen=seen) == 2
    draws = {sample_token(logits, SamplingParams(temperature=5.0, top_k=2), torch.Generator().manual_seed(i))
             for i in range(200)}
    assert draws == {1, 2}  # only the two best, both reachable at high temperature
    # top_p=0.5: token 1 alone has p > 0.5 -> always chosen.
    assert {sample_token(logits, SamplingParams(top_p=0.5), torch.Generator().manual_seed(i)) for i in range(50)} == {1}
    a = [sample_token(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    with pytest.raises(ValueError):
        SamplingParams(top_p=0).validate()


# ---------------------------------------------------------------------------------------------
# Streaming text: UTF-8, stop strings, <think>.
# ---------------------------------------------------------------------------------------------
TEXT = "你好，世界！🙂 Emoji 👍🏽 and 中文 mixed: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓"


def test_incremental_detokenizer_utf8(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "test needs a character split across tokens"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT


class ScriptedLM(nn.Module):
    """A fake transformers-style causal LM that emits a fixed token script (exercises the fallback runner).

    `delay` seconds per forward make it slow enough to watch streaming, stop it or disconnect mid-answer.
    """

    def __init__(self, script: list[int], vocab: int, delay: float = 0.0) -> None:
        from transformers import LlamaConfig

        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, max_position_embeddings=256, eos_token_id=2)
        self.lm_head = nn.Linear(1, vocab, bias=False)
        self.script, self.delay = script, delay

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, **kw):
        if self.delay:
            time.sleep(self.delay)
        # The "cache" only counts tokens: p = prompt length (first call), n = tokens seen.
        past = kw.get(CACHE_FIELD)
        p = getattr(past, "p", input_ids.shape[1])
        n = getattr(past, "n", 0) + input_ids.shape[1]
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e9)
        logits[:, 0, self.script[min(n - p, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, **cache_kwargs(SimpleNamespace(n=n, p=p)))


def script_ids(tok, pieces: list[str | int]) -> list[int]:
    """Token ids of text pieces (encoded) and raw ids (kept)."""
    out = []
    for p in pieces:
        out += [p] if isinstance(p, int) else tok.encode(p, add_special_tokens=False)
    return out


def run_script(tok, pieces: list[str | int], params: SamplingParams, split_think: bool = False, prompt="Hi"):
    script = script_ids(tok, pieces)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    lm = ScriptedLM(script, len(tok))
    return list(stream(lm, tok, prompt_ids, params, split_think=split_think)), script


def test_stop_string_spanning_tokens_is_never_emitted(tok):
    text, stop = "Sure: alpha beta gamma delta", "ta gam"
    deltas, script = run_script(tok, [text, 2], SamplingParams(temperature=0, stop=[stop]))
    assert not any(stop in tok.decode([i]) for i in script), "stop string must span tokens for this test"
    assert "".join(d.content for d in deltas) == "Sure: alpha be"
    assert deltas[-1].finish_reason == "stop"
    # A partial match that never completes is released in full at the end.
    deltas, _ = run_script(tok, ["x ta ga", 2], SamplingParams(temperature=0, stop=[stop]))
    assert "".join(d.content for d in deltas) == "x ta ga"
    f = StopStringFilter(["</s>", "ab"])
    assert f.push("xx</") == ("xx", False) and f.push("s>yy") == ("", True)


def test_stream_eos_max_tokens_and_utf8(tok):
    deltas, _ = run_script(tok, [TEXT, 2, "never shown"], SamplingParams(temperature=0))
    assert "".join(d.content for d in deltas) == TEXT and deltas[-1].finish_reason == "stop"
    assert all("\ufffd" not in d.content for d in deltas)
    deltas, script = run_script(tok, [TEXT], SamplingParams(temperature=0, max_new_tokens=3))
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.content for d in deltas) == tok.decode(script[:3])


def test_think_split(tok):
    deltas, _ = run_script(tok, [3, "Let me think: 2+2.", 4, "\n\nThe answer is 4.", 2], SamplingParams(temperature=0),
                           split_think=True)
    assert "".join(d.reasoning for d in deltas) == "Let me think: 2+2."
    assert "".join(d.content for d in deltas) == "The answer is 4."
    # Template already opened <think>: the model continues inside it; tags split over chunks still parse.
    s = ThinkSplitter(in_think=True)
    parts = [s.push(c) for c in "abc</th" "ink>\nDone <thi"] + [s.flush()]
    assert "".join(r for r, _ in parts) == "abc" and "".join(c for _, c in parts) == "Done <thi"


def test_leading_whitespace_only_stripped_after_think(tok):
    """An answer's own indentation survives; only the blank lines right after </think> go."""
    code = "    indented()\n  next"
    deltas, _ = run_script(tok, [code, 2], SamplingParams(temperature=0), split_think=True)
    assert "".join(d.content for d in deltas) == code
    deltas, _ = run_script(tok, [3, "hmm", 4, "\n\n  x = 1", 2], SamplingParams(temperature=0), split_think=True)
    assert "".join(d.content for d in deltas) == "x = 1"
    s = ThinkSplitter()
    parts = [s.push(c) for c in ("\n", " Hi ", "<think>a</thi", "nk>", "\n", "\n", " B")] + [s.flush()]
    assert "".join(c for _, c in parts) == "\n Hi B" and "".join(r for r, _ in parts) == "a"


# ---------------------------------------------------------------------------------------------
# Frequency / presence penalties (OpenAI semantics), checked by hand.
# ---------------------------------------------------------------------------------------------
def test_frequency_presence_penalty_by_hand():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence
    expected = torch.tensor([1.0, 3.0 - 2 * 0.5 - 0.4, 2.0 - 0.5 - 0.4, -1.0, 0.5])
    torch.testing.assert_close(apply_frequency_presence(logits, counts, 0.5, 0.4), expected)
    greedy = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.4)
    assert sample_token(logits, greedy, counts=counts) == 0  # 1.0 > 3 - 2 - 0.4 = 0.6 and 2 - 1 - 0.4 = 0.6
    assert sample_token(logits, SamplingParams(temperature=0), counts=counts) == 1  # off unless asked
    assert sample_token(logits, SamplingParams(temperature=0, presence_penalty=-2.0), counts=counts) == 1
    for bad in (dict(frequency_penalty=2.5), dict(presence_penalty=-2.01)):
        with pytest.raises(ValueError, match="penalty"):
            SamplingParams(**bad).validate()


def test_frequency_presence_penalty_in_decoding(model, tok):
    """Batched decoding with penalties equals a hand-written loop; only generated tokens are counted."""
    ids = tok.encode(PROMPTS[1], add_special_tokens=False)
    freq, pres, n = 1.5, 0.7, 10
    x, counts, ref = torch.tensor([ids]), torch.zeros(model.config.vocab_size), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(x, use_cache=False).logits[0, -1].float()
            nxt = int((logits - freq * counts - pres * (counts > 0).float()).argmax())
            ref.append(nxt)
            counts[nxt] += 1
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, frequency_penalty=freq,
                            presence_penalty=pres)
    out = generate(model, tok, [ids, PROMPTS[0]], params, max_batch=2)
    assert out[0].token_ids == ref
    plain = generate(model, tok, [ids], GREEDY)[0].token_ids[:n]
    assert plain != ref, "the penalties must change this greedy answer (else the test proves nothing)"


# ---------------------------------------------------------------------------------------------
# YaRN: one context-length helper, decoding past the trained length.
# ---------------------------------------------------------------------------------------------
def test_yarn_factor_decodes_past_the_trained_length(tok):
    from transformers import LlamaConfig

    from tinylm.models.config import TinyLMConfig
    from tinylm.models.config import context_length as config_context_length

    model = tiny_model(len(tok), max_position_embeddings=32)
    ids = tok.encode(PROMPTS[3], add_special_tokens=False)
    capped = generate(model, tok, [ids], SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))[0]
    assert BatchGenerator(model, tok).max_seq_len == 32 and len(ids) + len(capped.token_ids) == 33
    enable_yarn(model, 4.0)  # after a forward: the cached RoPE frequencies must be rebuilt
    assert context_length(model) == 128 and BatchGenerator(model, tok, max_batch=1).max_seq_len == 128
    assert (model.config.yarn_factor, model.config.yarn_original_max_position) == (4.0, 32)
    out = generate(model, tok, [ids], SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))[0]
    assert len(ids) + len(out.token_ids) == len(ids) + 60 > 32
    assert out.token_ids == full_forward_greedy(model, ids, 60)  # cached decode = full forwards past 32
    built = tiny_model(len(tok), max_position_embeddings=32, yarn_factor=4.0)  # same weights, YaRN from the start
    x = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, built(x).logits)
        assert not torch.allclose(model(x).logits, tiny_model(len(tok), max_position_embeddings=32)(x).logits)
    # The helper: trained x factor for tinylm, max_position_embeddings for HF configs (already extended).
    assert config_context_length(TinyLMConfig(max_position_embeddings=128, yarn_factor=4,
                                              yarn_original_max_position=32)) == 128
    assert config_context_length(LlamaConfig(max_position_embeddings=77)) == 77
    with pytest.raises(ValueError):
        enable_yarn(model, 0.5)
