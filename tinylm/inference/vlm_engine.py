"""Image and text requests in one continuous batch: the inference engine for vision-language models.

A request to a VLM (tinylm/models/vision.py) may carry images. Its prompt holds `tokens_per_image`
image-pad tokens per image, made from `<image>` placeholders by the same encoder as training and
`tinylm chat --image` (tinylm/data/vision_data.py: `encode_vlm_chat`). Only prefill differs from text:

    admitted rows -> the images of all image prompts through the vision tower + projector in ONE
                     batch (N, tokens_per_image, H)
                  -> the wrapped runner's batched prefill of all prompts, text and image alike; the
                     VisionLM's embedding hook scatters the features over the image-pad rows, in
                     order (`VisionLM.image_features`, LLaVA's masked_scatter; Liu et al. 2023)

After prefill the image positions are ordinary KV-cache entries, so image and text sequences decode
together in the same steps (continuous batching, Orca: Yu et al. 2022), through the same decoder
(StaticRunner + fast_decode for a tinylm LM, DynamicRunner for a transformers LM). The image-pad token
is never sampled: its logit is -inf, as `VisionLM.generate` suppresses it.

Image prompts are prefilled in the same batched forwards as text ones: the features of all admitted
images, in row order, are handed to the hook in `in_order` mode, so each forward of a prefill that the
runner splits into groups takes the next features its image-pad tokens need, and the block fails if
any image is left over (a miscounted prompt can never shift one request's image into another's; new
sequences are also checked at `new_sequence`). The text path (BatchGenerator, StaticRunner) is
unchanged: text-only requests to a VLM cost what they cost on the bare LM.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from PIL import Image

from tinylm.inference.generate import (
    BatchGenerator,
    Completion,
    SamplingParams,
    Sequence,
    prompt_opens_think,
    run_to_completion,
)
from tinylm.models.vision import VisionLM


class ImageRunner:
    """A BatchGenerator runner (StaticRunner / DynamicRunner over the VLM's LM) that fills image-pad rows
    at prefill and never lets the image-pad token be sampled. Everything else goes to the wrapped runner."""

    def __init__(self, inner: Any, gen: VisionBatchGenerator) -> None:
        self.inner, self.gen = inner, gen
        self.image_id = gen.vlm.settings.image_token_id

    def __getattr__(self, name: str) -> Any:  # cache, fast, prefill_budget, ...: the wrapped runner's
        return getattr(self.inner, name)

    def _no_image_token(self, logits: torch.Tensor) -> torch.Tensor:
        logits[:, self.image_id] = float("-inf")
        return logits

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write prompts into fresh rows; return last-position logits (b, V). The images of every image
        prompt are encoded in one tower batch; the wrapped runner's prefill (which may split the rows
        into several forwards) then fills each forward's image-pad rows with the next features in order."""
        pixels = [p for p in (self.gen.pixels.pop(self.gen.running[r], None) for r in rows) if p is not None]
        if not pixels:  # text only: the text path as it is
            return self._no_image_token(self.inner.prefill(rows, prompts))
        vlm = self.gen.vlm
        feats = vlm.encode_images(torch.cat(pixels).to(self.inner.device))  # (N, P', H), in row order
        with vlm.image_features(feats, in_order=True):
            return self._no_image_token(self.inner.prefill(rows, prompts))

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return logits (b, V)."""
        return self._no_image_token(self.inner.decode(rows, tokens))

    def free(self, row: int) -> None:
        self.inner.free(row)


class VisionBatchGenerator(BatchGenerator):
    """BatchGenerator over a VisionLM's language model whose sequences may carry images.

    `new_sequence(..., images=[PIL images])` checks that the prompt has one image-pad block per image
    and runs the tower's image processor there (the caller's thread); the engine thread only runs the
    model. `tinylm.inference.engine.Engine` builds one for a VisionLM.
    """

    def __init__(self, vlm: VisionLM, tokenizer: Any, max_batch: int = 8, max_seq_len: int | None = None) -> None:
        super().__init__(vlm.language_model.eval(), tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        self.vlm = vlm.eval()
        self.runner = ImageRunner(self.runner, self)
        # Sequence -> pixel_values (N, 3, S, S) until its prefill; a sequence cancelled before it leaves no entry.
        self.pixels: weakref.WeakKeyDictionary[Sequence, torch.Tensor] = weakref.WeakKeyDictionary()

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, images: list[Image.Image] | None = None,
                     **kw: Any) -> Sequence:
        seq = super().new_sequence(prompt_ids, params, **kw)
        s = self.vlm.settings
        n_tokens, n_images = sum(1 for t in prompt_ids if t == s.image_token_id), len(images or [])
        if n_tokens != n_images * s.tokens_per_image:
            raise ValueError(f"the prompt has {n_tokens} image-pad tokens ({s.tokens_per_image} per image) "
                             f"but {n_images} image(s) were given")
        if n_images:
            self.pixels[seq] = self.vlm.preprocess(images)
        return seq


def generate_vlm(vlm: VisionLM, tokenizer: Any, requests: list[tuple[list[dict], list[Image.Image]]],
                 params: SamplingParams | None = None, max_batch: int = 16) -> list[Completion]:
    """Answer conversations whose `<image>` placeholders match their images (text-only ones take []),
    all batched together; `generate()` of tinylm/inference/generate.py for a VLM."""
    from tinylm.data.vision_data import encode_vlm_chat

    params = params or SamplingParams()
    encoded = [encode_vlm_chat(tokenizer, msgs, vlm.settings.tokens_per_image, add_generation_prompt=True)[0]
               for msgs, _ in requests]
    max_len = max(len(e) for e in encoded) + params.max_new_tokens
    gen = VisionBatchGenerator(vlm, tokenizer, max_batch=min(max_batch, len(encoded)), max_seq_len=max_len)
    seqs = [gen.new_sequence(ids, params, images=imgs, split_think=True, in_think=prompt_opens_think(tokenizer, ids))
            for ids, (_, imgs) in zip(encoded, requests)]
    return run_to_completion(gen, seqs)


def load_vlm_for_inference(model_dir: str, lora: str | None = None, dtype: str | None = "auto",
                           device: str | None = None, yarn_factor: float = 1.0, quantize: str | None = None,
                           ) -> tuple[VisionLM, Any]:
    """(VisionLM in eval mode, tokenizer) for `tinylm serve` / `tinylm generate`; options that the text
    loader (tinylm/inference/chat.py: load_for_inference) supports but a VLM does not yet are refused."""
    from tinylm.models.vision import load_vlm

    for flag, given in (("--lora", lora), ("--yarn-factor", yarn_factor != 1.0),
                        ("--quantize", quantize not in (None, "none"))):
        if given:
            raise ValueError(f"{flag}: not supported for vision-language models yet ({model_dir} has vlm_config.json)")
    if dtype not in (None, "auto", "fp32"):
        raise ValueError(f"--dtype {dtype}: vision-language models run in fp32 for now (docs/vision.md)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_vlm(model_dir, device=device)
    return model.eval(), tok
