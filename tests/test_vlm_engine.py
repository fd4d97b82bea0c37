"""The inference engine with images: image and text requests in one batch give what the VisionLM's own
greedy `generate` (transformers, tinylm/inference/vlm_chat.py) and the text engine give one by one;
`tinylm generate --model VLM --image`."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_vision import COLOURS, make_tower

from tinylm.inference.generate import SamplingParams, generate
from tinylm.inference.vlm_chat import reply
from tinylm.models.loading import load_model
from tinylm.models.vision import build_vlm

N_NEW = 8


def tiny_vlm(tower: Path):
    """A random VisionLM whose answers depend on the image (a wide projector init: random features are
    otherwise too small to move a random LM's argmax)."""
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    model = build_vlm(lm, tok, tower, pool=2)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.projector.linear_1.weight, std=0.5)
    return model.eval(), tok


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def image(colour: str) -> Image.Image:
    return Image.new("RGB", (32, 32), COLOURS[colour])


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return tiny_vlm(make_tower(tmp_path_factory.mktemp("tower")))


def ref_ids(model, tok, messages: list[dict], images: list[str]) -> list[int]:
    """The VisionLM's own greedy answer ids (transformers' generate on the LM, image-pad suppressed)."""
    from tinylm.data.vision_data import encode_vlm_chat

    ids, _ = encode_vlm_chat(tok, messages, model.settings.tokens_per_image, add_generation_prompt=True)
    x = torch.tensor([ids])
    pixels = model.preprocess([image(c) for c in images]) if images else None
    out = model.generate(x, pixels, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


def test_image_and_text_requests_in_one_batch(vlm):
    from tinylm.inference.vlm_engine import VisionBatchGenerator, generate_vlm

    model, tok = vlm
    q = [{"role": "user", "content": "<image>\nWhat colour?"}]
    two = [{"role": "user", "content": "<image>\n<image>\nSame colour?"}]
    text = [{"role": "user", "content": "Hello there"}]
    reqs = [(q, ["red"]), (text, []), (two, ["blue", "green"]), (q, ["blue"])]
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0, ignore_eos=True)
    outs = generate_vlm(model, tok, [(m, [image(c) for c in cs]) for m, cs in reqs], params)
    refs = [ref_ids(model, tok, m, cs) for m, cs in reqs]
    assert [o.token_ids for o in outs] == refs
    assert refs[0] != refs[3]  # the image changes the answer: the test would see an engine that ignored it
    text_only = generate(model.language_model, tok, [text], params, chat=True)[0]
    assert outs[1].token_ids == text_only.token_ids  # a text row in a VLM batch = the bare LM's answer
    assert model.settings.image_token_id not in sum(refs, [])  # never sampled

    # the runner's prefill split into one forward per prompt: each forward takes the next features in order
    from tinylm.data.vision_data import encode_vlm_chat

    gen = VisionBatchGenerator(model, tok, max_batch=4)
    gen.runner.inner.prefill_budget = 1
    seqs = [gen.new_sequence(encode_vlm_chat(tok, m, model.settings.tokens_per_image, add_generation_prompt=True)[0],
                             params, images=[image(c) for c in cs]) for m, cs in reqs]
    for seq in seqs:
        gen.add(seq)
    while gen.has_work():
        gen.step()
    assert [seq.output_ids for seq in seqs] == refs
    with pytest.raises(ValueError, match="0 image-pad tokens .* but 1 image"):
        gen.new_sequence(tok.encode("hi"), params, images=[image("red")])
    with pytest.raises(ValueError, match=r"1 image\(s\) were given but had no <\|image_pad\|> tokens"), model.image_features(
            model.encode_images(model.preprocess([image("red")])), in_order=True):
        model.language_model(torch.tensor([tok.encode("hi")]))


def test_engine_batches_images_and_refuses_them_for_text_models(vlm):
    from test_generate import tiny_model

    from tinylm.data.vision_data import encode_vlm_chat
    from tinylm.inference.engine import Engine

    model, tok = vlm
    q = [{"role": "user", "content": "<image>\nWhat colour?"}]
    ids, _ = encode_vlm_chat(tok, q, model.settings.tokens_per_image, add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0, ignore_eos=True)
    with Engine(model, tok, max_batch=4) as engine:
        seqs = [engine.submit(ids, params, lambda d: None, images=[image(c)]) for c in ("red", "green", "blue")]
        while not all(s.finished for s in seqs):
            time.sleep(0.01)
        assert [s.output_ids for s in seqs] == [ref_ids(model, tok, q, [c]) for c in ("red", "green", "blue")]
    with Engine(tiny_model(len(tok)), tok, max_batch=1) as text_engine:
        with pytest.raises(ValueError, match="takes no images"):
            text_engine.submit(ids, params, lambda d: None, images=[image("red")])


def test_generate_cli_with_images(vlm, tmp_path, capsys):
    from tinylm.cli import main

    model, tok = vlm
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blue.png").write_bytes(png("blue"))
    (tmp_path / "red.png").write_bytes(png("red"))
    rows = [{"prompt": "What colour?"}, {"prompt": "Same?", "image": "blue.png"}, {"prompt": "Hello"}]
    prompts = tmp_path / "data" / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out" / "o.jsonl"
    argv = ["generate", "--model", str(tmp_path / "vlm"), "--prompts", str(prompts), "--out", str(out),
            "--temperature", "0", "--max-new-tokens", str(N_NEW)]
    assert main(argv + ["--image", str(tmp_path / "red.png")]) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in got] == [["../red.png"], ["../red.png", "../data/blue.png"], ["../red.png"]]
    assert got[1]["messages"][0]["content"] == "<image>\n<image>\nSame?"  # --image first, then the row's own
    for r, colours in zip(got, (["red"], ["red", "blue"], ["red"])):
        msgs, answer = r["messages"][:-1], r["messages"][-1]["content"]
        assert answer.strip() == reply(model, tok, msgs, [png(c) for c in colours], max_new_tokens=N_NEW)
    capsys.readouterr()
    rows[1]["image"] = "missing.png"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(argv) == 2
    assert "p.jsonl:2: image 'missing.png'" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--image", "x.png"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err


def test_transformers_language_model_through_the_engine(tmp_path):
    """A VLM over a transformers causal LM (LlamaForCausalLM): the engine's per-sequence DynamicCache runner."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinylm.inference.vlm_engine import generate_vlm
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model = build_vlm(lm.eval(), tok, make_tower(tmp_path / "tower"), pool=2)
    torch.nn.init.normal_(model.projector.linear_1.weight, std=0.5)
    model.eval()
    q = [{"role": "user", "content": "<image>\nWhat colour?"}]
    reqs = [(q, ["red"]), ([{"role": "user", "content": "hi"}], []), (q, ["blue"])]
    outs = generate_vlm(model, tok, [(m, [image(c) for c in cs]) for m, cs in reqs],
                        SamplingParams(max_new_tokens=N_NEW, temperature=0, ignore_eos=True))
    refs = [ref_ids(model, tok, m, cs) for m, cs in reqs]
    assert [o.token_ids for o in outs] == refs and refs[0] != refs[2]
