"""`tinylm export ... --format gguf --ollama`: a Modelfile next to the GGUF, so `ollama create` just works.

Why a hand-written TEMPLATE: Ollama does not run the Jinja chat template embedded in the GGUF; it
renders its own Go `text/template` over `.Messages`. A template that differs from the one the model
was fine-tuned with by a single newline costs quality silently, so this one mirrors
`tinylm.text.tokenizer.CHATML_TEMPLATE` construct by construct, and tests/test_gguf.py renders both (the Go
side with Go's real text/template when `go` is installed) on sample conversations and compares bytes:

    every message       <|im_start|>{role}\\n ... <|im_end|>\\n     (system, user, assistant, tool alike)
    assistant thinking  <think>\\n{thinking}\\n</think>\\n before the content (Ollama's `.Thinking` field is
                        what our template reads as `reasoning_content`)
    generation prompt   <|im_start|>assistant\\n after the last message unless it is an assistant turn
                        (HF's add_generation_prompt=True; Ollama continues a trailing assistant message)

Tools: our ChatML template renders tool *results* as `tool` turns and has no tool-definition section
(the model writes `<tool_call>...</tool_call>` in its content), so the TEMPLATE does not reference
`.Tools` either; Ollama will therefore not offer its structured tool-calling API for this model.
"""

from __future__ import annotations

from pathlib import Path

# Go text/template. No trim markers: every byte outside {{ }} is literal output.
OLLAMA_TEMPLATE = (
    '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
    '<|im_start|>{{ $m.Role }}\n'
    '{{ if and (eq $m.Role "assistant") $m.Thinking }}<think>\n{{ $m.Thinking }}\n</think>\n{{ end }}'
    '{{ $m.Content }}<|im_end|>\n'
    '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}'
    '{{ end }}'
)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def _quote(s: str) -> str:
    """A Modelfile string in triple quotes (Ollama's syntax for values that span lines)."""
    if '"""' in s:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{s}"""'


def modelfile_text(gguf_name: str, system: str | None = None, temperature: float | None = None) -> str:
    """The Modelfile: FROM ./file.gguf, TEMPLATE, stop PARAMETERs, optional SYSTEM / temperature."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(OLLAMA_TEMPLATE)}"]
    lines += [f'PARAMETER stop "{t}"' for t in STOP_TOKENS]
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature:g}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def check_template(chat_template: str | None) -> None:
    """Refuse a Modelfile for a model whose chat template is not tinylm's ChatML (the TEMPLATE would lie)."""
    from tinylm.text.tokenizer import CHATML_TEMPLATE

    if chat_template != CHATML_TEMPLATE:
        raise ValueError("--ollama writes a TEMPLATE equivalent to tinylm's ChatML chat template, but this "
                         "model's tokenizer has a different chat template; write a Modelfile by hand for it")


def write_modelfile(gguf_path: str | Path, chat_template: str | None, system: str | None = None) -> Path:
    """Write `Modelfile` next to `gguf_path` (FROM is relative, so the directory can be moved)."""
    check_template(chat_template)
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    out.write_text(modelfile_text(gguf_path.name, system), encoding="utf-8")
    return out
