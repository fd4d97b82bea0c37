"""The compiled decode step (tinylm/inference/compiled_decode.py) against the readable forward.

The fixed-shape step (whole-cache attention with a mask by position, K/V written by index, weights
passed in) is checked eagerly — same logits as the model's forward, same greedy text — and so is the
library cache on disk (one build per shape, reused by other weights and other processes, never built
in `auto` mode) and the fallback to the eager fast step when building fails. One slow test runs the
real torch.export + AOTInductor build and loads the library into a model with other weights.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_fast_decode import model_for, prefilled

from tinylm.inference import compiled_decode, fast_decode
from tinylm.inference.generate import SamplingParams, generate
from tinylm.text.tokenizer import load_tokenizer


def _greedy(model, monkeypatch, mode: str) -> list[str]:
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", mode)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    prompts = [[40, 41, 42, 43, 44, 45], [50, 51, 52, 53, 54, 55]]  # equal lengths: the compiled step's case
    return [c.text for c in generate(model, load_tokenizer(), prompts, params)]


@pytest.fixture
def libraries(monkeypatch, tmp_path) -> list:
    """Building and loading replaced by the uncompiled StaticStep (a file per library still written);
    returns the list of steps built. Mode 1 (build when missing) in an empty cache directory."""
    made, steps = [], {}

    def fake_build(step, example, path):
        made.append(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("library")
        steps[path] = step

    monkeypatch.setattr(compiled_decode, "build", fake_build)
    monkeypatch.setattr(compiled_decode, "load", lambda path: steps[path])
    monkeypatch.setenv("TINYLM_DECODE_CACHE", str(tmp_path / "decode"))
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "1")
    return made


def _steps_against_forward(model, decoder, lens: list[int], steps: int = 5) -> float:
    """Largest |logit difference| of `decoder` against the forward over `steps` greedy steps, all rows."""
    return _rows_against_forward(model, decoder, lens, list(range(len(lens))), steps)


@pytest.mark.parametrize("overrides", [dict(qk_norm=True), dict(num_key_value_heads=4)])
def test_static_step_matches_forward(overrides, libraries):
    model = model_for(**overrides)
    assert _steps_against_forward(model, compiled_decode.CompiledDecoder(model), [7, 7]) < 1e-4
    assert len(libraries) == 1


def _rows_against_forward(model, decoder, lens: list[int], rows: list[int], steps: int = 5) -> float:
    """Largest |logit difference| of `decoder` against the forward over `steps` greedy steps of cache rows
    `rows` (a server's running sequences); the same K/V written, the other rows untouched."""
    ours, ref = prefilled(model, lens)
    index = torch.tensor(rows)
    tokens, worst = torch.randint(3, 6400, (len(rows),)), 0.0
    others = [i for i in range(len(lens)) if i not in rows]
    before = [k[others].clone() for k in ours.keys]
    for _ in range(steps):
        got = decoder(fast_decode.prepare(model), ours, tokens, index)
        assert got is not None, "the compiled step did not run"
        with torch.no_grad():
            want = model(tokens[:, None], cache=ref, cache_rows=index, logits_to_keep=1).logits[:, -1]
        worst = max(worst, (got - want).abs().max().item())
        assert torch.equal(ours.seq_lens, ref.seq_lens)
        tokens = want.argmax(-1)
    for k_ours, k_ref, k_before in zip(ours.keys, ref.keys, before):
        assert (k_ours - k_ref).abs().max().item() < 1e-4
        assert torch.equal(k_ours[others], k_before), "a row that was not decoding changed"
    return worst


@pytest.mark.parametrize("lens, rows", [([5, 9, 7, 6], [1, 3]), ([5, 9, 7, 6], [2]), ([5, 9, 7], [0, 1, 2])])
def test_ragged_rows_match_forward(libraries, lens, rows):
    """Rows at different positions, or a subset of the cache (continuous batching): masked attention."""
    model = model_for(qk_norm=True)
    assert _rows_against_forward(model, compiled_decode.CompiledDecoder(model), lens, rows) < 1e-4
    assert len(libraries) == 1


def test_ragged_four_or_more_rows_use_the_eager_step(libraries):
    model = model_for()
    ours, _ = prefilled(model, [5, 9, 7, 6])
    assert compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), ours, torch.tensor([3, 4, 5, 6]),
                                                  torch.arange(4)) is None
    assert not libraries


@pytest.mark.parametrize("compiled_faster", [True, False])
def test_four_or_more_rows_only_where_measured_faster(monkeypatch, libraries, compiled_faster):
    """Compute-bound batches: the step is timed against the eager one once, the verdict kept on disk."""
    timed = []

    def fake_timing(p, cache, weights, fn):
        timed.append(cache.batch_size)
        return (1.0, 0.5) if compiled_faster else (0.5, 1.0)
    monkeypatch.setattr(compiled_decode, "time_steps", fake_timing)
    model = model_for()
    ours, _ = prefilled(model, [6, 6, 6, 6])
    tokens, rows = torch.full((4,), 3), torch.arange(4)
    got = compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), ours, tokens, rows)
    assert (got is not None) == compiled_faster and timed == [4]
    again, _ = prefilled(model, [6, 6, 6, 6])  # the next request: library loaded, verdict on disk
    got = compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), again, tokens, rows)
    assert (got is not None) == compiled_faster and timed == [4]
    model.__dict__.pop("_tinylm_compiled_decode")  # a new process: the verdict is read from disk
    got = compiled_decode.CompiledDecoder(model)(fast_decode.prepare(model), ours, tokens, rows)
    assert (got is not None) == compiled_faster and timed == [4] and len(libraries) == 1
    assert "failed" not in model.__dict__["_tinylm_compiled_decode"]


def test_time_steps_leaves_the_cache_alone(libraries):
    model = model_for()
    ours, _ = prefilled(model, [6, 6, 6, 6])
    before = [k.clone() for k in ours.keys], ours.seq_lens.clone()
    p = fast_decode.prepare(model)
    weights = compiled_decode.step_weights(p, 4)
    eager, compiled = compiled_decode.time_steps(p, ours, weights, compiled_decode.StaticStep(p))
    assert eager > 0 and compiled > 0
    assert all(torch.equal(a, b) for a, b in zip(before[0], ours.keys)) and torch.equal(before[1], ours.seq_lens)


@pytest.mark.parametrize("rows", [1, 4])
def test_int8_matches_eager_int8_step(monkeypatch, libraries, rows):
    """1-3 rows: bf16 activations; 4+ rows: activations quantised per row, int8 x int8 products."""
    monkeypatch.setattr(compiled_decode, "time_steps", lambda *args: (1.0, 0.5))  # "compiled faster"
    model = model_for(qk_norm=True)
    fast_decode.set_quantization(model, "int8")
    p = fast_decode.prepare(model)
    ours, ref = prefilled(model, [7] * rows)
    decoder, index, tokens = compiled_decode.CompiledDecoder(model), torch.arange(rows), torch.arange(11, 11 + rows)
    for _ in range(5):
        got = decoder(p, ours, tokens, index)
        want = fast_decode.decode_step(p, ref, tokens, index)
        assert got is not None and (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-4
        tokens = want.argmax(-1)
    assert len(libraries) == 1


def test_generate_identical_and_built_once_per_shape(monkeypatch, libraries):
    model = model_for(qk_norm=True)
    want = _greedy(model, monkeypatch, "0")
    assert _greedy(model, monkeypatch, "1") == want
    assert _greedy(model, monkeypatch, "1") == want
    assert len(libraries) == 1, "second generate() with the same cache bucket must not rebuild"
    fast_decode.set_quantization(model, "int8")  # fp32 and int8 in turns (the benchmark does): one library each
    _greedy(model, monkeypatch, "1")
    fast_decode.set_quantization(model, "none")
    assert _greedy(model, monkeypatch, "1") == want
    assert len(libraries) == 2


def test_auto_mode_uses_libraries_on_disk_for_any_weights(monkeypatch, libraries):
    """Weights are inputs of the step: a library built for one model serves another of the same shape
    (another process, another checkpoint); `auto` never builds."""
    first, second, other_shape = model_for(seed=0), model_for(seed=1), model_for(seed=0, intermediate_size=96)
    _greedy(first, monkeypatch, "1")
    assert len(libraries) == 1
    assert _greedy(second, monkeypatch, "auto") == _greedy(second, monkeypatch, "0")
    assert len(second.__dict__["_tinylm_compiled_decode"]) == 1, "auto mode did not load the library"
    assert len(libraries) == 1
    _greedy(other_shape, monkeypatch, "auto")
    assert len(libraries) == 1, "auto mode built a library"


def test_library_key_covers_what_the_code_depends_on(monkeypatch):
    def key(model, batch: int = 1, length: int = 256) -> str:
        p = fast_decode.prepare(model)
        from tinylm.models.kv_cache import StaticKVCache
        return compiled_decode.library_key(p, StaticKVCache(model.config, batch, length),
                                           compiled_decode.step_weights(p, batch), batch, False)

    base = key(model_for(seed=0))
    assert key(model_for(seed=1)) == base, "weights are inputs: other weights, same library"
    assert len({base, key(model_for(seed=0), batch=2), key(model_for(seed=0), length=512),
                key(model_for(seed=0, qk_norm=False)), key(model_for(seed=0, intermediate_size=96))}) == 5
    int8 = model_for(seed=0)
    fast_decode.set_quantization(int8, "int8")
    assert key(int8) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # inductor writes the thread count into its loops
        assert key(model_for(seed=0)) != base
    finally:
        torch.set_num_threads(threads)


def test_build_failure_falls_back_with_one_log_line(monkeypatch, caplog, tmp_path):
    def broken(step, example, path):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(compiled_decode, "build", broken)
    monkeypatch.setenv("TINYLM_DECODE_CACHE", str(tmp_path))
    model = model_for()
    want = _greedy(model, monkeypatch, "0")
    with caplog.at_level(logging.WARNING, logger="tinylm.inference.compiled_decode"):
        assert _greedy(model, monkeypatch, "1") == want
    assert len([r for r in caplog.records if "compiled decode step failed" in r.message]) == 1


@pytest.mark.slow
def test_real_aot_build_matches_forward_and_serves_other_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_DECODE_CACHE", str(tmp_path))
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "1")
    model = model_for(qk_norm=True)
    decoder = compiled_decode.CompiledDecoder(model)
    assert _steps_against_forward(model, decoder, [6], steps=4) < 1e-4
    assert "failed" not in decoder.loaded, "the AOTInductor build fell back to eager"
    assert len(list(tmp_path.glob("*.pt2"))) == 1

    def no_build(*args):
        raise AssertionError("built again")
    built = compiled_decode.build
    monkeypatch.setattr(compiled_decode, "build", no_build)
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "auto")
    other = model_for(seed=3, qk_norm=True)  # a fresh model: the library is read from disk
    assert _steps_against_forward(other, compiled_decode.CompiledDecoder(other), [6], steps=4) < 1e-4
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "1")
    monkeypatch.setattr(compiled_decode, "build", built)  # the real build again, for the ragged step
    assert _rows_against_forward(other, compiled_decode.CompiledDecoder(other), [6, 9], [1], steps=4) < 1e-4
    monkeypatch.setattr(compiled_decode, "build", no_build)
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "auto")
    fast_decode.set_quantization(other, "int8")  # int8 needs its own library: none in auto mode
    ours, _ = prefilled(other, [6])
    assert compiled_decode.CompiledDecoder(other)(fast_decode.prepare(other), ours, torch.tensor([5]),
                                                  torch.arange(1)) is None


@pytest.mark.slow
def test_real_aot_build_int8_rows_matches_eager_int8_step(monkeypatch, tmp_path):
    """4 rows, int8: per-row activation quantisation and torch._int_mm inside the compiled library."""
    monkeypatch.setenv("TINYLM_DECODE_CACHE", str(tmp_path))
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "1")
    monkeypatch.setattr(compiled_decode, "time_steps", lambda *args: (1.0, 0.5))  # "compiled faster"
    model = model_for(qk_norm=True)
    fast_decode.set_quantization(model, "int8")
    p = fast_decode.prepare(model)
    ours, ref = prefilled(model, [6] * 4)
    decoder, rows, tokens = compiled_decode.CompiledDecoder(model), torch.arange(4), torch.arange(20, 24)
    for _ in range(3):
        got = decoder(p, ours, tokens, rows)
        want = fast_decode.decode_step(p, ref, tokens, rows)
        assert got is not None and (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-4
        tokens = want.argmax(-1)


def test_cli_compile_flag_and_environment(monkeypatch):
    """`tinylm chat|generate`: --compile / --no-compile win, then TINYLM_COMPILE_DECODE, else build."""
    from tinylm.inference.chat import set_compile_mode

    for flag, env, want in [(True, "0", "1"), (False, "1", "0"), (None, "auto", "auto"), (None, None, "1")]:
        if env is None:
            monkeypatch.delenv("TINYLM_COMPILE_DECODE", raising=False)
        else:
            monkeypatch.setenv("TINYLM_COMPILE_DECODE", env)
        set_compile_mode(flag)
        assert compiled_decode.mode() == want, (flag, env)


def test_continuous_batching_ragged_rows_same_text(monkeypatch, libraries):
    """Prompts of different lengths in a larger cache (a server's case): same greedy text as eager."""
    model = model_for(qk_norm=True)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54, 55, 56]]

    def texts(mode: str) -> list[str]:
        monkeypatch.setenv("TINYLM_COMPILE_DECODE", mode)
        return [c.text for c in generate(model, load_tokenizer(), prompts, params, max_batch=4)]
    assert texts("1") == texts("0")
    assert len(libraries) == 1  # 2 running rows of 4, ragged


def test_prebuild_for_a_server(monkeypatch, libraries):
    from tinylm.inference.generate import BatchGenerator

    model = model_for(qk_norm=True)
    gen = BatchGenerator(model, load_tokenizer(), max_batch=8)
    assert compiled_decode.prebuild(gen) == 3 and len(libraries) == 3  # 1, 2 and 3 running requests
    compiled_steps = []
    call = compiled_decode.CompiledDecoder.__call__

    def counting(self, *args):
        logits = call(self, *args)
        compiled_steps.append(logits is not None)
        return logits
    monkeypatch.setattr(compiled_decode.CompiledDecoder, "__call__", counting)
    monkeypatch.setenv("TINYLM_COMPILE_DECODE", "auto")
    gen.add(gen.new_sequence([40, 41, 42], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)))
    while gen.has_work():
        gen.step()
    assert len(libraries) == 3, "the server built a library after start"
    assert compiled_steps == [True] * 3, compiled_steps  # 4 tokens: 1 from the prefill, 3 decode steps
