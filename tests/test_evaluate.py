"""Tests for tinylm.evaluation.evaluate / tinylm.evaluation.benchmarks: file layouts, letter scoring, bits per byte, errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tinylm.evaluation import benchmarks as B
from tinylm.evaluation import evaluate as E


@pytest.fixture(scope="module")
def tok():
    corpus = [p.read_text(encoding="utf-8") for p in B.ASSETS.rglob("*") if p.is_file()]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=0, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


class FakeLM(torch.nn.Module):
    """Looks like a causal LM; the next-token logits always favour the token(s) of one letter."""

    def __init__(self, tok, letter: str, max_len: int = 4096, completion: str = ""):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=len(tok), max_position_embeddings=max_len)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.favour = {i for t in (letter, " " + letter) for i in tok.encode(t) if len(tok.encode(t)) == 1}
        self.completion = tok.encode(completion)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits[..., sorted(self.favour)] = 10.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, max_new_tokens=8, **kw):
        tail = torch.tensor(self.completion).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


# --- layouts -----------------------------------------------------------------------------------

def test_bundled_layouts_parse():
    ce = B.load_mcq("ceval")
    assert set(ce.eval) == {"computer_network", "high_school_physics"} and len(ce.dev["computer_network"]) == 5
    assert ce.subject_names["computer_network"] == "计算机网络"
    assert [it.answer for it in ce.eval["computer_network"]] == [0, 1, 2, 1]
    cm = B.load_mcq("cmmlu")
    assert cm.eval["nutrition"][1].choices[3] == "水" and cm.eval["nutrition"][1].answer == 3
    mm = B.load_mcq("mmlu")  # headerless CSV
    assert mm.eval["astronomy"][0].question.startswith("What is the largest planet")
    assert mm.eval["astronomy"][0].answer == 2 and len(mm.dev["astronomy"]) == 5
    g = B.load_mcq("mcq")
    assert sum(map(len, g.eval.values())) == 6 and g.eval["science"][2].choices == ["Yes", "No"]
    gen = B.load_gen()
    assert gen[0].answer == "26" and "####" in gen[0].solution
    assert "Bits per byte" in B.load_texts()[0]


def test_single_file_finds_dev_sibling_and_mmlu_jsonl(tmp_path):
    ce = B.load_mcq("ceval", B.ASSETS / "ceval" / "val" / "computer_network_val.csv")
    assert list(ce.eval) == ["computer_network"] and len(ce.dev["computer_network"]) == 5
    p = tmp_path / "test.jsonl"
    rows = [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "Sky colour?", "subject": "misc", "choices": ["blue", "red", "green", "black"], "answer": 0}]
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    mm = B.load_mcq("mmlu", tmp_path)
    assert mm.eval["math"][0].answer == 1 and mm.eval["misc"][0].choices[0] == "blue"
    # prompts: language and header of each benchmark
    it = mm.eval["math"][0]
    en = B.build_prompt("mmlu", "math", it, [mm.eval["misc"][0]], "letter")
    assert en.startswith("The following are multiple choice questions (with answers) about math.")
    assert "Answer: A\n\n2+2?\nA. 3\nB. 4" in en and en.endswith("Answer:")
    zh = B.build_prompt("ceval", "计算机网络", it, [], "letter")
    assert zh.startswith("以下是中国关于计算机网络考试的单项选择题") and zh.endswith("答案：")
    assert B.build_prompt("mmlu", "math", it, [], "option").endswith("2+2?\nAnswer:")


@pytest.mark.parametrize("name,content,needle", [
    ("x_val.csv", "id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,E\n", "row 2: answer 'E'"),
    ("x_val.csv", "id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,A\n1,Q2?,a,b\n", "row 3: expected 7 columns"),
    ("x_val.csv", "id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,\n", "row 2: answer is empty"),
    ("x_val.csv", "id,prompt,A,B,C,D,answer\n0,Q?,a,b,c,d,A\n", "no 'question' column"),
    ("x_val.csv", "id,question,A,B,C,D,answer\n0,,a,b,c,d,A\n", "row 2: question is empty"),
    ("x.jsonl", '{"question": "Q?", "answer": "A"}\n', "line 1: missing field 'choices'"),
    ("x.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": "A"}\n{bad\n', "line 2: invalid JSON"),
    ("x.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": 5}\n', "out of range"),
])
def test_malformed_files_name_file_row_and_problem(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="x") as e:
        B.load_mcq("ceval" if name.endswith(".csv") else "mcq", p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_mmlu_short_row_and_missing_split(tmp_path):
    (tmp_path / "a_test.csv").write_text("Q?,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a_test.csv: row 1: expected 6 columns"):
        B.load_mcq("mmlu", tmp_path)
    with pytest.raises(FileNotFoundError, match="no files for split 'val'"):
        B.load_mcq("mmlu", tmp_path, split="val")


# --- scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("letter,expected", [("B", {"computer_network": 0.5, "high_school_physics": 0.25}),
                                             ("A", {"computer_network": 0.25, "high_school_physics": 0.25})])
def test_letter_scoring_known_accuracy(tok, letter, expected):
    r = E.evaluate_mcq(FakeLM(tok, letter), tok, "ceval", shots=2, batch_size=3)
    assert {s: v["acc"] for s, v in r["subjects"].items()} == expected
    assert r["acc"] == pytest.approx(sum(expected.values()) / 2) and r["random"] == 0.25 and r["n"] == 8


def test_batched_letter_logprobs_match_transformers(tok, llama):
    """Left-padded batched scoring == one unpadded transformers forward per prompt."""
    ds = B.load_mcq("mmlu")
    prompts = [B.build_prompt("mmlu", s, it, B.pick_shots(ds, it, k), "letter")
               for k, (s, it) in enumerate([(s, it) for s in ds.eval for it in ds.eval[s][:2]])]
    seqs = [tok.encode(p) for p in prompts]
    assert len({len(s) for s in seqs}) > 1  # padding really happens
    batched = E._forward_last(llama, seqs, 1, 0)[:, 0]
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = torch.log_softmax(llama(torch.tensor([s])).logits[0, -1].float(), -1)
        torch.testing.assert_close(batched[i], ref, atol=1e-4, rtol=1e-4)
    # continuation scoring agrees with a direct sum over the joined sequence
    ctx, cont = seqs[0], tok.encode(" Jupiter")
    with torch.no_grad():
        lp = torch.log_softmax(llama(torch.tensor([ctx + cont])).logits[0].float(), -1)
    ref = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    got = E.score_continuations(llama, tok, [(ctx, cont), (seqs[1], cont[:1])], batch_size=2)[0]
    assert got == pytest.approx(ref, abs=1e-4)


def test_option_scoring_and_context_too_short(tok, llama):
    r = E.evaluate_mcq(llama, tok, "mmlu", shots=1, scoring="option", limit=2)
    assert r["n"] == 4 and 0.0 <= r["acc"] <= 1.0
    with pytest.raises(ValueError, match=r"astronomy_test.csv: row 1: 5-shot prompt is \d+ tokens but the model "
                                         r"context is 200 tokens; use --shots [1-4]"):
        E.evaluate_mcq(FakeLM(tok, "A", max_len=200), tok, "mmlu", shots=5)
    with pytest.raises(ValueError, match=r"even the 0-shot prompt is \d+ tokens"):
        E.evaluate_mcq(FakeLM(tok, "A", max_len=20), tok, "cmmlu", shots=2)


def test_max_length_past_context_refused_and_few_shots_reported(tok):
    with pytest.raises(ValueError, match=r"--max-length 3000 is longer than the model's context of 200 tokens"):
        E.evaluate_mcq(FakeLM(tok, "A", max_len=200), tok, "mmlu", max_length=3000)
    with pytest.raises(ValueError, match="longer than the model's context"):
        E.evaluate_ppl(FakeLM(tok, "A", max_len=200), tok, max_length=201)
    ds = B.load_mcq("ceval")
    avail = min(len(ds.dev.get(s) or ds.eval[s]) for s in ds.eval)
    with pytest.warns(UserWarning, match=rf"only \d+ example\(s\) available for --shots {avail + 3}"):
        r = E.evaluate_mcq(FakeLM(tok, "B", max_len=100000), tok, "ceval", shots=avail + 3)
    assert r["shots"] == avail + 3 and r["shots_used"][0] < avail + 3


def test_bits_per_byte_by_hand(tok, llama, tmp_path):
    text = B.load_texts()[0][:300]
    ids = [0] + tok.encode(text)
    with torch.no_grad():
        logits = llama(torch.tensor([ids])).logits[0].float()
    nats = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
    bpb = nats / math.log(2) / len(text.encode("utf-8"))
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    full = E.evaluate_ppl(llama, tok, f, max_length=1024)
    slid = E.evaluate_ppl(llama, tok, f, max_length=32, stride=8, batch_size=4)
    assert full["tokens"] == len(ids) - 1 and full["bpb"] == pytest.approx(bpb, rel=1e-5)
    assert full["ppl"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert slid["tokens"] == len(ids) - 1 and math.isfinite(slid["bpb"])  # every token scored exactly once
    assert slid["bpb"] == pytest.approx(slid["loss"] * slid["tokens"] / math.log(2) / slid["bytes"])


# --- generation --------------------------------------------------------------------------------

def test_extract_and_format():
    assert E.extract_answer("so 3*12=36, 36-10=26.\n#### 26") == "26"
    assert E.extract_answer("<think>3+4=7</think><answer>The answer is 1,000</answer>") == "1,000"
    assert E.normalize_answer("1,000.") == E.normalize_answer("1000") == "1000"
    assert E.extract_answer("final: [x=5]", regex=r"x=(\d+)") == "5"
    assert E.FORMAT_RE.match("<think>a</think>\n<answer>b</answer>")
    assert not E.FORMAT_RE.match("<think>a<answer>b</answer>")


def test_gen_exact_match_and_format_rate(tok):
    fake = FakeLM(tok, "A", completion="<think>add</think><answer>26</answer><|endoftext|>")
    r = E.evaluate_gen(fake, tok, max_new_tokens=32)
    assert r["n"] == 5 and r["exact_match"] == pytest.approx(0.2) and r["format_rate"] == 1.0
    assert r["samples"][0]["pred"] == "26" and r["samples"][0]["correct"]


# --- several models, CLI -------------------------------------------------------------------------

def test_cli_two_models_one_table(tok, llama, tmp_path, capsys):
    import argparse

    for name in ("m1", "m2"):
        llama.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    parser = argparse.ArgumentParser()
    E.add_cli(parser.add_subparsers())
    out = tmp_path / "res.json"
    args = parser.parse_args(["eval", str(tmp_path / "m1"), str(tmp_path / "m2"), "--task", "mcq",
                              "--limit", "1", "--out", str(out), "--device", "cpu"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| subject | n | random % | m1 % | m2 % |" in table and "**overall**" in table
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"m1", "m2"} and res["models"]["m1"]["acc"] == res["models"]["m2"]["acc"]
    with pytest.raises(ValueError, match="one per model"):
        E.run_eval([str(tmp_path / "m1")] * 3, "mcq", lora=["a", "b"])


def test_tinylm_model_with_lora_adapter(tmp_path):
    """`tinylm eval DIR --lora ADAPTER` on a tinylm model: ppl equals the merged model's ppl."""
    from tinylm.export.interop import init_model
    from tinylm.models.lora import apply_lora, merge_lora, save_adapter

    base = tmp_path / "base"
    init_model("tiny", base, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    model, tok = E.load_for_eval(str(base), device="cpu")
    model = apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", str(base))
    text = B.load_texts()[:2]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in text))
    plain = E.evaluate_ppl(*E.load_for_eval(str(base), device="cpu"), data=str(data))
    adapted = E.evaluate_ppl(*E.load_for_eval(str(base), lora=str(tmp_path / "adapter"), device="cpu"), data=str(data))
    merged = E.evaluate_ppl(merge_lora(model).eval(), tok, data=str(data))
    assert adapted["loss"] == pytest.approx(merged["loss"], abs=1e-4)
    assert abs(adapted["loss"] - plain["loss"]) > 1e-3  # the adapter really was applied
