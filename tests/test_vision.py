"""Vision-language model: token expansion and masks, projector/pooling, image scatter, multi-image and
text-only rows, bad images, frozen parameters after training, save/load, CLIP and SigLIP towers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinylm.data.vision_data import collate, encode_vlm_chat, load_rows
from tinylm.models.loading import load_model
from tinylm.models.vision import IMAGE_PAD, build_vlm, load_vlm, pool_patches

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}


def make_tower(path: Path, kind: str = "clip", size: int = 32, patch: int = 8) -> Path:
    """A tiny randomly initialised vision model + image processor directory (nothing downloaded)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    kw = dict(image_size=size, patch_size=patch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**kw)).save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    else:
        SiglipVisionModel(SiglipVisionConfig(**kw)).save_pretrained(path)
        SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    return make_tower(tmp_path_factory.mktemp("tower"))


@pytest.fixture()
def vlm(tower):
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    return build_vlm(lm, tok, tower, pool=2, projector_norm=True), tok


def write_data(d: Path, rows: list[dict]) -> Path:
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(d / f"{name}.png")
    path = d / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(image, q: str = "<image>\nWhat colour?", a: str = "red") -> dict:
    row = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if image is not None:
        row["image"] = image
    return row


def test_expansion_masks_and_labels(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    assert s.tokens_per_image == (32 // 8) ** 2 // 4 and s.drop_cls  # 4x4 patches, 2x2 pooling, CLS dropped
    path = write_data(tmp_path, [qa(["red.png", "blue.png"], "<image>\n<image>\nSame colour?", "no"),
                                 qa(None, "Hello", "hi"), qa("green.png", "What colour?", "green")])
    rows = load_rows(path, tok, s.tokens_per_image, s.image_token_id, seq_len=128)
    assert [len(r.images) for r in rows] == [2, 0, 1]
    for r in rows:
        ids = torch.tensor(r.ids)
        assert int((ids == s.image_token_id).sum()) == len(r.images) * s.tokens_per_image
        assert not any(m for i, m in zip(r.ids, r.mask) if i == s.image_token_id)
    # a row without <image> gets its image in front of the first user turn
    assert rows[2].ids.index(s.image_token_id) < rows[2].ids.index(tok.encode("What", add_special_tokens=False)[0])
    batch = collate(rows, tok.pad_token_id, model.processor)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert bool((batch["labels"][batch["input_ids"] == s.image_token_id] == -100).all())  # no loss on image tokens
    answer = tok.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answer.startswith("no")
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_typed_image_pad_is_text_and_placeholders_counted(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    ids, _ = encode_vlm_chat(tok, [{"role": "user", "content": "<image>"}], s.tokens_per_image)
    assert ids.count(s.image_token_id) == s.tokens_per_image
    path = write_data(tmp_path, [qa("red.png", f"look {IMAGE_PAD} here")])
    with pytest.raises(ValueError, match=r"data.jsonl:1: .*reserved string"):
        load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128)
    path = write_data(tmp_path, [qa("red.png", "<image> and <image>")])
    with pytest.raises(ValueError, match=r"data.jsonl:1: 2 <image> placeholder\(s\) but 1 image"):
        load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128)


def test_bad_images_name_file_and_line(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    (tmp_path / "notimage.png").write_text("hello")
    path = write_data(tmp_path, [qa("red.png"), qa("missing.png"), qa("notimage.png"), qa(["red.png", 5])])
    with pytest.raises(ValueError, match=r"data.jsonl:2: image 'missing.png': No such file"):
        load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128)
    logs: list[str] = []
    rows = load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128, skip_invalid=True, log=logs.append)
    assert len(rows) == 1 and "skipped 3 invalid row(s)" in logs[0]
    path.write_text(json.dumps(qa("notimage.png")) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: image 'notimage.png': not a readable image"):
        load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128)


def test_projector_pooling_and_scatter(vlm):
    model, tok = vlm
    s = model.settings
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    pooled = pool_patches(x, 2)
    assert pooled.shape == (2, 4, 3)
    assert torch.allclose(pooled[0, 0], x[0, [0, 1, 4, 5]].mean(0))  # top-left 2x2 block of the 4x4 grid
    with pytest.raises(ValueError, match="square grid"):
        pool_patches(torch.zeros(1, 15, 3), 2)
    imgs = [Image.new("RGB", (32, 32), c) for c in COLOURS.values()]
    pixels = model.preprocess(imgs)
    feats = model.encode_images(pixels)
    assert feats.shape == (3, s.tokens_per_image, model.config.hidden_size)
    # rows: [img0 img1 text] [text only] [img2]: image blocks are filled in row-major order
    pad = [s.image_token_id] * s.tokens_per_image
    ids = torch.tensor([[300] + pad + pad + [7], [9] * (2 * len(pad) + 2), [300] + pad + [7] * (len(pad) + 1)])
    captured = []
    model.language_model.model.layers[0].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    model(input_ids=ids, pixel_values=pixels)
    emb = captured[0]
    n = s.tokens_per_image
    assert torch.allclose(emb[0, 1:1 + n], feats[0]) and torch.allclose(emb[0, 1 + n:1 + 2 * n], feats[1])
    assert torch.allclose(emb[2, 1:1 + n], feats[2])
    text = model.language_model.get_input_embeddings().weight
    assert torch.equal(emb[1], text[ids[1]])  # the text-only row is untouched
    with pytest.raises(ValueError, match="3 image.* but 2 image"):
        model(input_ids=ids, pixel_values=pixels[:2])


def test_frozen_parameters_bit_identical_after_training(tower, tmp_path):
    from tinylm.train import train
    from tinylm.training.trainconfig import load_config

    path = write_data(tmp_path, [qa(f"{c}.png", "<image>\nWhat colour?", c) for c in COLOURS] * 4)
    recipe = Path(__file__).parent.parent / "recipes" / "vlm_pretrain.yaml"
    base = ["model=tiny", f"vision.encoder={tower}", f"data.train={path}", "batch_size=4", "max_steps=3",
            "warmup_steps=1", "log_every=1", "dtype=fp32", "vision.pool=2"]
    cfg = load_config(recipe, base + [f"out_dir={tmp_path / 'pre'}"])
    train(cfg, log=lambda *a: None)
    model, _ = load_vlm(tmp_path / "pre" / "final")
    lm0, _ = load_model("tiny", dtype="fp32", seed=cfg.seed)
    from tinylm.models.vision import grow_vocab
    grow_vocab(lm0, model.language_model.config.vocab_size)
    ref_lm = lm0.state_dict()
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, ref_lm[k]), k  # train_lm=none: the LM did not move
    from tinylm.models.vision import load_vision_tower
    ref_tower = load_vision_tower(tower)[0].state_dict()
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, ref_tower[k]), k
    # stage 2 from the saved VLM: only decoder layer 1 (and the projector) of the LM may change
    cfg2 = load_config(recipe, base + [f"model={tmp_path / 'pre' / 'final'}", "vision.train_lm=layers:1",
                                       f"out_dir={tmp_path / 'sft'}"])
    train(cfg2, log=lambda *a: None)
    model2, _ = load_vlm(tmp_path / "sft" / "final")
    changed = {k for k, v in model2.language_model.state_dict().items()
               if not torch.equal(v, model.language_model.state_dict()[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert not torch.equal(model2.projector.linear_1.weight, model.projector.linear_1.weight)


def test_save_load_roundtrip_and_supervised_loss(vlm, tmp_path):
    from tinylm.posttrain.vlm_train import supervised_ce

    model, tok = vlm
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    loaded, tok2 = load_vlm(tmp_path / "vlm")
    assert tok2.convert_tokens_to_ids(IMAGE_PAD) == model.settings.image_token_id
    path = write_data(tmp_path, [qa("red.png"), qa(None, "Hi", "hello there"), qa("blue.png", a="blue")])
    rows = load_rows(path, tok, model.settings.tokens_per_image, model.settings.image_token_id, 128)
    batch = collate(rows, tok.pad_token_id, model.processor)
    model.eval()
    loaded.eval()
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        a = model(**kw).logits
        b = loaded(**kw).logits
        assert torch.allclose(a, b, atol=1e-5)
        n = (batch["labels"][:, 1:] != -100).sum()
        ce, _, _ = supervised_ce(model, model.language_model, batch, n)
        ref = model(**kw, labels=batch["labels"]).loss  # transformers-style mean CE over the same targets
        assert torch.allclose(ce / n, ref, atol=1e-5)


def test_siglip_tower_has_no_cls(tmp_path):
    path = make_tower(tmp_path / "siglip", kind="siglip")
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    model = build_vlm(lm, tok, path)
    assert not model.settings.drop_cls and model.settings.tokens_per_image == 16
    pixels = model.preprocess([Image.new("RGB", (50, 30), (1, 2, 3))])
    assert model.encode_images(pixels).shape == (1, 16, lm.config.hidden_size)


def test_vqa_scoring_and_bytes_images(vlm, tmp_path):
    from tinylm.data.vision_data import read_image_bytes
    from tinylm.evaluation.vlm_eval import normalise, score

    assert normalise("The Red.") == "red"
    rows = [{"answer": "red", "task": "colour"}, {"answer": "blue", "task": "colour"}, {"answer": "red", "task": "colour"}]
    table = score(rows, ["red", "Red!", "red"])
    assert table["colour"]["accuracy"] == pytest.approx(2 / 3) and table["colour"]["majority"] == pytest.approx(2 / 3)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert read_image_bytes({"bytes": buf.getvalue()}, tmp_path, "x:1") == buf.getvalue()
    with pytest.raises(ValueError, match="x:1: not a readable image"):
        read_image_bytes(b"garbage", tmp_path, "x:1")


LLAVA_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
x = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=x["input_ids"], pixel_values=x["pixel_values"]).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
assert "tinylm" not in sys.modules
"""


def test_llava_export_logit_parity_without_tinylm(tower, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from tinylm.export.vlm_export import export_llava

    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    model = build_vlm(lm, tok, tower, projector_norm=False)
    torch.nn.init.normal_(model.projector.linear_1.weight, std=0.2)  # non-trivial image features
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    with pytest.raises(ValueError, match=r"projector LayerNorm \(vision.projector_norm=true\).*vision.projector_norm=false"):
        normed = build_vlm(load_model("tiny", dtype="fp32", seed=0)[0], tok, tower)
        normed.save_pretrained(tmp_path / "normed")
        tok.save_pretrained(tmp_path / "normed")
        export_llava(tmp_path / "normed", tmp_path / "no")
    export_llava(tmp_path / "vlm", tmp_path / "llava")
    ids, _ = encode_vlm_chat(tok, [{"role": "user", "content": "<image>\nWhat colour? <image>"}],
                             model.settings.tokens_per_image, add_generation_prompt=True)
    x = {"input_ids": torch.tensor([ids]),
         "pixel_values": model.preprocess([Image.new("RGB", (32, 32), c) for c in list(COLOURS.values())[:2]])}
    save_file(x, str(tmp_path / "x.safetensors"))
    (tmp_path / "run.py").write_text(LLAVA_SCRIPT)
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "llava"), str(tmp_path / "x.safetensors"),
                    str(tmp_path / "y.safetensors")], check=True, cwd=tmp_path)
    theirs = load_file(str(tmp_path / "y.safetensors"))["logits"]
    with torch.no_grad():
        ours = model.eval()(**x).logits
    assert theirs.shape == ours.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    with torch.no_grad():  # the images matter: without them the logits differ
        blank = model(input_ids=x["input_ids"], pixel_values=torch.zeros_like(x["pixel_values"])).logits
    assert not torch.allclose(blank, theirs, atol=1e-3)


def test_chat_with_image_and_eval_gen_on_image_rows(vlm, tmp_path, capsys):
    from tinylm.cli import main
    from tinylm.evaluation.evaluate import run_eval

    model, tok = vlm
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    path = write_data(tmp_path, [qa("red.png", a="red"), qa(["red.png", "blue.png"], "<image><image>Same?", "no"),
                                 qa(None, "Hi", "hello")])
    png = str(tmp_path / "red.png")
    assert main(["chat", str(tmp_path / "vlm"), "--image", png, "--prompt", "What colour?", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    capsys.readouterr()  # a random model's answer: any text (possibly empty)
    assert main(["chat", str(tmp_path / "vlm"), "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["chat", "tiny", "--image", png, "--prompt", "x"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err
    out = run_eval([str(tmp_path / "vlm")], "gen", data=str(path), max_new_tokens=4)
    r = out["models"]["vlm"]
    assert r["n"] == 3 and set(r["by_task"]) == {"all", "overall"} and 0.0 <= r["exact_match"] <= 1.0
