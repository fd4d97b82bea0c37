"""The opt-in compiled decode step (tinylm/inference/compiled_decode.py) against the readable forward.

The fixed-shape step (whole-cache attention with a mask by position, K/V written by index) is
checked eagerly — same logits as the model's forward, same greedy text — and so is the compile
cache (one compile per shape, reused across generate() calls) and the fallback to the eager fast
step when compiling fails. One slow test runs the real inductor compile.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_fast_decode import model_for, prefilled

from tinylm.inference import compiled_decode, fast_decode
from tinylm.inference.generate import SamplingParams, generate
from tinylm.text.tokenizer import load_tokenizer


def _greedy(model, monkeypatch, compiled: bool) -> list[str]:
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "1" if compiled else "0")
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    prompts = [[40, 41, 42, 43, 44, 45], [50, 51, 52, 53, 54, 55]]  # equal lengths: the compiled step's case
    return [c.text for c in generate(model, load_tokenizer(), prompts, params)]


@pytest.fixture
def eager_compile(monkeypatch) -> list:
    """compile_step replaced by the uncompiled StaticStep; returns the list of steps 'compiled'."""
    made = []

    def fake(step):
        made.append(step)
        return step
    monkeypatch.setattr(compiled_decode, "compile_step", fake)
    return made


def _steps_against_forward(model, decoder, lens: list[int], steps: int = 5) -> float:
    """Largest |logit difference| of `decoder` against the forward over `steps` greedy steps."""
    ours, ref = prefilled(model, lens)
    rows = torch.arange(len(lens))
    tokens, worst = torch.randint(3, 6400, (len(lens),)), 0.0
    for _ in range(steps):
        got = decoder(fast_decode.prepare(model), ours, tokens, rows)
        with torch.no_grad():
            want = model(tokens[:, None], cache=ref, cache_rows=rows, logits_to_keep=1).logits[:, -1]
        worst = max(worst, (got - want).abs().max().item())
        assert torch.equal(ours.seq_lens, ref.seq_lens)
        tokens = want.argmax(-1)
    return worst


@pytest.mark.parametrize("overrides", [dict(qk_norm=True), dict(num_key_value_heads=4)])
def test_static_step_matches_forward(overrides, eager_compile):
    model = model_for(**overrides)
    assert _steps_against_forward(model, compiled_decode.CompiledDecoder(model), [7, 7]) < 1e-4
    assert len(eager_compile) == 1


def test_ragged_rows_use_the_eager_step(eager_compile):
    model = model_for()
    ours, _ = prefilled(model, [5, 9])
    assert compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), ours, torch.tensor([3, 4]),
                                                  torch.arange(2)) is None
    assert not eager_compile


def test_four_or_more_rows_use_the_eager_step(eager_compile):
    """Compute-bound batches decode eagerly (the compiled graph was slower there)."""
    model = model_for()
    ours, _ = prefilled(model, [6] * compiled_decode.MAX_ROWS)
    tokens = torch.full((compiled_decode.MAX_ROWS,), 3)
    assert compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), ours, tokens,
                                                  torch.arange(compiled_decode.MAX_ROWS)) is None
    assert not eager_compile


def test_int8_one_row_matches_eager_int8_step(eager_compile):
    model = model_for(qk_norm=True)
    fast_decode.set_quantization(model, "int8")
    p = fast_decode.prepare(model)
    ours, ref = prefilled(model, [7])
    decoder, rows, tokens = compiled_decode.CompiledDecoder(model), torch.arange(1), torch.tensor([11])
    for _ in range(5):
        got = decoder(p, ours, tokens, rows)
        want = fast_decode.decode_step(p, ref, tokens, rows)
        assert (got - want).abs().max().item() < 1e-4
        tokens = want.argmax(-1)
    assert len(eager_compile) == 1
    four, _ = prefilled(model, [3, 3, 3, 3])  # 4+ rows: eager int8 x int8 products, not this step
    assert decoder(p, four, torch.arange(4), torch.arange(4)) is None


def test_generate_identical_and_compiled_once_per_shape(monkeypatch, eager_compile):
    model = model_for(qk_norm=True)
    want = _greedy(model, monkeypatch, compiled=False)
    assert _greedy(model, monkeypatch, compiled=True) == want
    assert _greedy(model, monkeypatch, compiled=True) == want
    assert len(eager_compile) == 1, "second generate() with the same cache bucket must not recompile"
    fast_decode.set_quantization(model, "int8")  # fp32 and int8 in turns (the benchmark does): one graph each
    _greedy(model, monkeypatch, compiled=True)
    fast_decode.set_quantization(model, "none")
    assert _greedy(model, monkeypatch, compiled=True) == want
    assert len(eager_compile) == 2


def test_compile_failure_falls_back_with_one_log_line(monkeypatch, caplog):
    def broken(step):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(compiled_decode, "compile_step", broken)
    model = model_for()
    want = _greedy(model, monkeypatch, compiled=False)
    with caplog.at_level(logging.WARNING, logger="tinylm.inference.compiled_decode"):
        assert _greedy(model, monkeypatch, compiled=True) == want
    assert [r.message for r in caplog.records if "compiled decode step failed" in r.message][:1]
    assert len([r for r in caplog.records if "compiled decode step failed" in r.message]) == 1


@pytest.mark.slow
def test_real_inductor_compile_matches_forward():
    model = model_for(qk_norm=True)
    decoder = compiled_decode.CompiledDecoder(model)
    assert _steps_against_forward(model, decoder, [6], steps=4) < 1e-4
    assert "failed" not in decoder.compiled, "the inductor compile fell back to eager"
