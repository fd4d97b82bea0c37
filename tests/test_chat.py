"""`tinylm chat` end to end through the real CLI: --prompt, interactive commands, history trimming, --lora, --yarn-factor."""

from __future__ import annotations

import io

import pytest
import torch
from test_generate import tiny_model

import tinylm.inference.chat as chat
from tinylm.cli import main
from tinylm.inference.generate import SamplingParams, generate, render_chat

CONTEXT = 96  # small, so a few turns overflow it


@pytest.fixture(scope="module")
def tok():
    from tinylm.text.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A saved tiny tinylm model; untied embeddings so that greedy answers are visible text."""
    path = tmp_path_factory.mktemp("chat") / "model"
    model = tiny_model(len(tok), max_position_embeddings=CONTEXT, tie_word_embeddings=False, eos_token_id=2)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def greedy_text(model, tok, messages, n: int) -> str:
    return generate(model, tok, [messages], SamplingParams(max_new_tokens=n, temperature=0), chat=True)[0].text


def run_chat(capsys, args: list[str], stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def record_prompts(monkeypatch) -> list[list[dict]]:
    """The (already trimmed) conversation sent to the model each turn."""
    seen, real = [], chat.fit_history

    def spy(tokenizer, messages, context, max_new_tokens):
        kept, ids = real(tokenizer, messages, context, max_new_tokens)
        seen.append(kept)
        return kept, ids

    monkeypatch.setattr(chat, "fit_history", spy)
    return seen


def test_prompt_answers_once(model_dir, tok, capsys):
    model, _ = chat.load_for_inference(model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = greedy_text(model, tok, msgs, 8)
    assert expected.strip(), "the test model must answer with visible text"
    code, out, _ = run_chat(capsys, [model_dir, "--system", "Be brief.", "--prompt", "Hi there",
                                     "--temperature", "0", "--max-new-tokens", "8"])
    assert code == 0 and out == expected + "\n"


def test_interactive_commands(model_dir, tok, capsys, monkeypatch):
    seen = record_prompts(monkeypatch)
    lines = "Hello\n/system Be terse.\nHi again\nFollow up\n/reset\nThird\n/bogus\n/system\nLast\n/exit\nnever sent\n"
    code, out, _ = run_chat(capsys, [model_dir, "--temperature", "0", "--max-new-tokens", "4"], lines, monkeypatch)
    assert code == 0
    assert "(system prompt set; history cleared)" in out and "(history cleared)" in out
    assert "unknown command" in out and "(system prompt removed; history cleared)" in out
    system = {"role": "system", "content": "Be terse."}
    assert [[(m["role"], m["content"]) for m in convo if m["role"] != "assistant"] for convo in seen] == [
        [("user", "Hello")],
        [("system", "Be terse."), ("user", "Hi again")],  # /system cleared the history
        [("system", "Be terse."), ("user", "Hi again"), ("user", "Follow up")],
        [("system", "Be terse."), ("user", "Third")],  # /reset keeps the system prompt
        [("user", "Last")],  # bare /system removed it
    ]
    model, _ = chat.load_for_inference(model_dir)
    answer = greedy_text(model, tok, [system, {"role": "user", "content": "Hi again"}], 4)
    assert seen[2][2] == {"role": "assistant", "content": answer}  # the previous answer is in the history
    assert answer in out


def test_fit_history_drops_whole_turns(tok):
    system = {"role": "system", "content": "S"}
    msgs = [system, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a long first answer " * 5},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"}]
    n = len(render_chat(tok, msgs))
    kept, ids = chat.fit_history(tok, msgs, n, 1)  # one token short: the oldest turn must go
    assert kept == [system] + msgs[3:]  # q1 *and* its answer; never an orphan assistant turn first
    assert ids == render_chat(tok, kept)
    kept, _ = chat.fit_history(tok, msgs, len(render_chat(tok, [system, msgs[-1]])) + 1, 1)
    assert kept == [system, msgs[-1]]
    orphan = [msgs[2]] + msgs[3:]  # a history that starts with an answer: trimming drops it alone
    kept, _ = chat.fit_history(tok, orphan, len(render_chat(tok, orphan)), 1)
    assert kept == msgs[3:]
    with pytest.raises(ValueError, match="too long"):
        chat.fit_history(tok, [system, {"role": "user", "content": "word " * 200}], 64, 1)


def test_history_trimmed_to_the_context(model_dir, tok, capsys, monkeypatch):
    seen = record_prompts(monkeypatch)
    lines = "".join(f"Question {i}: {'tell me more ' * 4}\n" for i in range(5)) + ("word " * 200) + "\nok\n"
    code, out, _ = run_chat(capsys, [model_dir, "--temperature", "0", "--max-new-tokens", "6", "--system", "S"],
                            lines, monkeypatch)
    assert code == 0
    assert "error: the message is too long" in out  # reported, and the chat goes on
    assert len(seen) == 6 and seen[-1][-1] == {"role": "user", "content": "ok"}
    assert any(len([m for m in c if m["role"] == "user"]) < i + 1 for i, c in enumerate(seen[:5])), "nothing trimmed"
    for convo in seen:
        assert convo[0]["role"] == "system" and convo[1]["role"] == "user" and convo[-1]["role"] == "user"
        assert [m["role"] for m in convo[1:]] == ["user", "assistant"] * (len(convo) // 2 - 1) + ["user"]
        assert len(render_chat(tok, convo)) + 6 <= CONTEXT


def test_lora_adapter_is_applied(model_dir, tok, tmp_path, capsys):
    from tinylm.models.lora import apply_lora, lora_modules, save_adapter

    model, _ = chat.load_for_inference(model_dir)
    base_answer = greedy_text(model, tok, [{"role": "user", "content": "Hi"}], 8)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    adapted_answer = greedy_text(model, tok, [{"role": "user", "content": "Hi"}], 8)
    assert adapted_answer != base_answer
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=model_dir)
    code, out, _ = run_chat(capsys, [model_dir, "--lora", str(tmp_path / "adapter"), "--prompt", "Hi",
                                     "--temperature", "0", "--max-new-tokens", "8"])
    assert code == 0 and out == adapted_answer + "\n"
    code, _, err = run_chat(capsys, [model_dir, "--lora", str(tmp_path / "missing"), "--prompt", "Hi"])
    assert code == 2 and "missing" in err


def test_yarn_factor_widens_the_chat_context(model_dir, tok, capsys):
    prompt = "word " * 60
    args = [model_dir, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "40"]
    code, _, err = run_chat(capsys, args)
    assert code == 2 and "too long" in err  # 60+ prompt tokens + room for the answer > 96
    code, out, _ = run_chat(capsys, args + ["--yarn-factor", "4"])
    model, _ = chat.load_for_inference(model_dir, yarn_factor=4)
    msgs = [{"role": "user", "content": prompt}]
    ref = generate(model, tok, [msgs], SamplingParams(max_new_tokens=40, temperature=0), chat=True)[0]
    assert code == 0 and out == ref.text + "\n"
    assert len(render_chat(tok, msgs)) + len(ref.token_ids) > CONTEXT  # decoded past the trained length
