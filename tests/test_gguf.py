"""GGUF / Ollama export checked against the programs users run it with.

llama.cpp itself (through llama-cpp-python, which vendors and compiles it) loads every exported
architecture and must give the logits transformers gives on the `--format hf` export of the same
model (max abs diff <= 1e-4 in f32; measured ~4e-7), tokenize exactly as our tokenizer, and continue a trained model
greedily with the same tokens in f32 and q8_0. The Ollama TEMPLATE is rendered by Go's real
text/template and must equal our Jinja chat template byte for byte. Tests needing llama_cpp or go
skip cleanly without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tinylm
from tinylm.export.gguf_export import export_gguf, gguf_arch, open_in_llama_cpp
from tinylm.export.ollama import OLLAMA_TEMPLATE, modelfile_text, write_modelfile
from tinylm.models.config import TinyLMConfig
from tinylm.text.tokenizer import CHATML_TEMPLATE, load_tokenizer, save_pretrained_portable

TOL = 1e-4  # the brief asked for 1e-3; with an f32 KV cache llama.cpp agrees to ~4e-7
SHAPE = dict(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
CASES = {  # name -> (config overrides, GGUF architecture)
    "qwen3": (dict(qk_norm=True), "qwen3"),
    "llama_untied": (dict(qk_norm=False, tie_word_embeddings=False), "llama"),
    "llama_yarn": (dict(qk_norm=False, yarn_factor=4.0, yarn_original_max_position=16), "llama"),
    "dots1": (dict(qk_norm=True, **MOE, num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.0),
              "dots1"),
    "qwen3moe": (dict(qk_norm=True, **MOE, num_shared_experts=0, moe_scoring="softmax", moe_bias_update_rate=0.0),
                 "qwen3moe"),
}
TEXT = ("Hello world!\n  你好，世界 🙂 it's 42 tokens,\tdon't   stop\n\n<|im_start|>user\nhi<|im_end|>\n"
        "def f(x):\n    return x ** 2  # ok")
STORY = ("Once upon a time a small robot lived in a lighthouse. Every night it counted the ships, "
         "wrote their names in a blue book and sang to the sea until morning came.")


def save_model(model: tinylm.TinyLMForCausalLM, d: Path) -> Path:
    model.save_pretrained(str(d))
    save_pretrained_portable(load_tokenizer(), d)
    return d


def make_case(name: str, d: Path, seed: int = 0) -> tinylm.TinyLMForCausalLM:
    torch.manual_seed(seed)
    model = tinylm.TinyLMForCausalLM(TinyLMConfig(**{**SHAPE, **CASES[name][0]})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):  # non-trivial norms, so a swapped q/k norm would show
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("expert_bias") and name == "dots1":  # a trained-looking selection bias
                b.copy_(0.3 * torch.randn_like(b))
    save_model(model, d)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny qwen3-style model that memorised STORY (a few seconds), so greedy decoding has clear margins."""
    torch.manual_seed(0)
    tok = load_tokenizer()
    ids = torch.tensor([tok(STORY, add_special_tokens=False)["input_ids"]])
    model = tinylm.TinyLMForCausalLM(TinyLMConfig(**{**SHAPE, "qk_norm": True}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, f"did not memorise the story (loss {loss.item():.2f})"
    return save_model(model.eval(), tmp_path_factory.mktemp("trained"))


def llama(path: str | Path):
    """llama.cpp with an f32 KV cache: its default f16 cache alone moves trained logits by ~1e-3 relative."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32
    return open_in_llama_cpp(path, logits_all=True, n_ctx=256, n_threads=2, n_batch=256, verbose=False, seed=0,
                             type_k=f32, type_v=f32)  # no AMX buffers on AMX CPUs: they crash there


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Argmax decoding through llama.cpp's KV cache, one token per eval call."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


# ---------------------------------------------------------------------------------------------
# llama.cpp parity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_logits_match_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM

    from tinylm.export.interop import export

    pytest.importorskip("llama_cpp")
    model = make_case(name, tmp_path / "m")
    export(tmp_path / "m", tmp_path / "hf")
    s = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert s.arch == CASES[name][1]
    ids = load_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 16, "long enough to pass the YaRN original context"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        ours = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(llama(s.path), ids)
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(got - ref).max() < TOL, f"{name}: max |llama.cpp - transformers| = {np.abs(got - ref).max():.2e}"


def test_llama_cpp_tokenizes_like_ours(trained):
    llm = llama(export_gguf(trained, trained / "t.gguf", "f32").path)
    tok = load_tokenizer()
    for text in (TEXT, STORY, " leading space", "trailing newline\n\n", "数字123和English混合。", "a\r\nb\u00a0c"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert llm.token_eos() == tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.detokenize(tok(TEXT, add_special_tokens=False)["input_ids"], special=True).decode() == TEXT
    # <|im_end|> is a control token (not printed); <think> is printed so reasoning parsers can see it
    think = tok("<think>\nhm\n</think>\nok<|im_end|>", add_special_tokens=False)["input_ids"]
    assert {2, 3, 4} <= set(think) and llm.detokenize(think).decode() == "<think>\nhm\n</think>\nok"


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_greedy_continuation_identical(trained, outtype):
    model = tinylm.TinyLMForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    s = export_gguf(trained, trained / f"g.{outtype}.gguf", outtype)
    prompt = load_tokenizer()(STORY[:40], add_special_tokens=False)["input_ids"]
    ref = torch_greedy(model, prompt, 24)
    assert len(set(ref)) > 12, "greedy output is degenerate; the test would prove little"
    assert llama_greedy(llama(s.path), prompt, 24) == ref
    if outtype == "f32":
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(llama_logits(llama(s.path), prompt) - want).max() < TOL


def test_q8_0_greedy_with_extra_buffers_one_token_per_decode(trained):
    """`open_in_llama_cpp(extra_buffers=True)` keeps llama.cpp's repacked / AMX weight buffers (on AMX CPUs
    they crash with several tokens per llama_decode, so the prompt goes one token per call): same greedy."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tinylm.TinyLMForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    s = export_gguf(trained, trained / "g.bufts.q8_0.gguf", "q8_0")
    prompt = load_tokenizer()(STORY[:40], add_special_tokens=False)["input_ids"]
    f32 = llama_cpp.GGML_TYPE_F32
    llm = open_in_llama_cpp(s.path, extra_buffers=True, logits_all=True, n_ctx=256, n_threads=2, n_batch=1,
                            n_ubatch=1, verbose=False, seed=0, type_k=f32, type_v=f32)
    assert llama_greedy(llm, prompt, 24) == torch_greedy(model, prompt, 24)


def test_q8_0_tensors_are_quantized(trained):
    import gguf

    s = export_gguf(trained, trained / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(s.path).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.attn_q_norm.weight"] == Q.F32
    assert s.n_bytes < (trained / "model.safetensors").stat().st_size / 2  # (the vocab + merges are ~0.2 MB)


# ---------------------------------------------------------------------------------------------
# metadata and chat template as llama.cpp reads them back
# ---------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "Short wavelengths scatter.\nSo: blue."}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'},
     {"role": "tool", "content": '{"temp": 21}'}],
    [{"role": "user", "content": "多行\n内容 🙂"}, {"role": "assistant", "content": "好的\n\n"}],
]


def hf_render(messages: list[dict]) -> str:
    """Our template as transformers renders it; a generation prompt unless the last turn is the assistant's."""
    return load_tokenizer().apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=messages[-1]["role"] != "assistant")


def test_llama_cpp_reads_back_metadata_and_template(trained):
    Jinja2ChatFormatter = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter

    llm = llama(export_gguf(trained, trained / "m.gguf", "f16").path)
    meta = llm.metadata
    assert meta["general.architecture"] == "qwen3"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert int(meta["tokenizer.ggml.eos_token_id"]) == 2 and meta["tokenizer.ggml.add_bos_token"] == "false"
    assert float(meta["qwen3.rope.freq_base"]) == 1_000_000.0
    for messages in CONVERSATIONS:  # llama-cpp-python's renderer (its server uses it) with the embedded template
        fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  add_generation_prompt=messages[-1]["role"] != "assistant")
        assert fmt(messages=messages).prompt == hf_render(messages)


def test_llama_cpp_builtin_chatml_matches(trained):
    """llama.cpp's C++ template engine (llama_chat_apply_template) detects ChatML from the embedded template."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")

    llm = llama(export_gguf(trained, trained / "c.gguf", "f16").path)
    plain = [m for m in CONVERSATIONS if not any("reasoning_content" in x for x in m)]
    for messages in plain:
        arr = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
        buf = ctypes.create_string_buffer(8192)
        tmpl = llm.metadata["tokenizer.chat_template"].encode()
        n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), messages[-1]["role"] != "assistant", buf, 8192)
        assert n > 0 and buf.raw[:n].decode() == hf_render(messages)


# ---------------------------------------------------------------------------------------------
# refusals, CLI, LoRA
# ---------------------------------------------------------------------------------------------
def test_unsupported_moe_is_refused_with_reason():
    sigmoid_no_qk = TinyLMConfig(**{**SHAPE, **MOE, "qk_norm": False})
    with pytest.raises(ValueError, match="dots1.*QK-norm.*glm4_moe"):
        gguf_arch(sigmoid_no_qk)
    shared_softmax = TinyLMConfig(**{**SHAPE, **MOE, "moe_scoring": "softmax", "num_shared_experts": 1})
    with pytest.raises(ValueError, match="qwen3moe has no shared experts"):
        gguf_arch(shared_softmax)
    assert gguf_arch(TinyLMConfig(**{**SHAPE, "qk_norm": False})) == "llama"


def test_cli_export_gguf_with_ollama(trained, tmp_path, capsys):
    from tinylm.cli import main

    out = tmp_path / "out" / "model.gguf"
    assert main(["export", str(trained), "--format", "gguf", "--outtype", "q8_0", "--out", str(out), "--ollama"]) == 0
    assert out.exists() and "GGUF qwen3, q8_0" in capsys.readouterr().out
    mf = (out.parent / "Modelfile").read_text()
    assert mf.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in mf
    assert main(["export", str(trained), "--format", "gguf", "--out", str(tmp_path / "x")]) != 0
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", str(trained), "--out", str(tmp_path / "hf"), "--ollama"]) != 0
    assert "go with --format gguf" in capsys.readouterr().err


def test_merge_lora_before_gguf(trained, tmp_path):
    import gguf

    from tinylm.models import lora

    model = tinylm.TinyLMForCausalLM.from_pretrained(str(trained), dtype=torch.float32)
    lora.apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.weight.normal_(0, 0.05)
    lora.save_adapter(model, tmp_path / "adapter", str(trained))
    merged = lora.merge_lora(model)
    s = export_gguf(trained, tmp_path / "merged.gguf", "f32", lora=str(tmp_path / "adapter"))
    q = {t.name: np.array(t.data) for t in gguf.GGUFReader(s.path).tensors}["blk.0.attn_q.weight"]
    want = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    base = tinylm.TinyLMForCausalLM.from_pretrained(str(trained)).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(q - want).max() < 1e-6 and np.abs(q - base.numpy()).max() > 1e-3


def test_reward_model_and_foreign_tokenizer_refused(tmp_path):
    from safetensors.torch import save_file

    from tinylm.posttrain.reward import SCORE_KEY

    make_case("qwen3", tmp_path / "rm")
    save_file({SCORE_KEY: torch.zeros(1, SHAPE["hidden_size"])}, str(tmp_path / "rm" / "score.safetensors"))
    with pytest.raises(ValueError, match="reward model"):
        export_gguf(tmp_path / "rm", tmp_path / "rm.gguf")
    make_case("qwen3", tmp_path / "m")
    tj = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="pre_tokenizer 'Metaspace'"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf.*"))


# ---------------------------------------------------------------------------------------------
# Ollama TEMPLATE rendered by Go's text/template
# ---------------------------------------------------------------------------------------------
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role     string
	Content  string
	Thinking string
}

func main() {
	var in struct {
		Template      string
		Conversations [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(in.Template))
	var out []string
	for _, msgs := range in.Conversations {
		var b []byte
		w := &buf{&b}
		if err := tmpl.Execute(w, map[string]any{"Messages": msgs}); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buf struct{ b *[]byte }

func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


def test_ollama_template_renders_like_chat_template(tmp_path):
    """Ollama's `.Thinking` is our `reasoning_content`; everything else maps field for field."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go not installed (apt-get install golang-go): Ollama's TEMPLATE is Go text/template")
    (tmp_path / "render.go").write_text(GO_RENDER)
    convs = [[{"Role": m["role"], "Content": m["content"], "Thinking": m.get("reasoning_content", "")}
              for m in msgs] for msgs in CONVERSATIONS]
    payload = json.dumps({"Template": OLLAMA_TEMPLATE, "Conversations": convs})
    res = subprocess.run([go, "run", str(tmp_path / "render.go")], input=payload, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "GO111MODULE": "off"})  # one file, standard library only
    assert res.returncode == 0, res.stderr
    for msgs, got in zip(CONVERSATIONS, json.loads(res.stdout), strict=True):
        assert got == hf_render(msgs)


def test_modelfile_text_and_refusal(tmp_path):
    text = modelfile_text("m.gguf", system="Be kind.")
    assert text.splitlines()[0] == "FROM ./m.gguf"
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text and 'SYSTEM """Be kind."""' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"', 'PARAMETER stop "<|im_start|>"']
    with pytest.raises(ValueError, match="different chat template"):
        write_modelfile(tmp_path / "m.gguf", "{{ messages }}")
