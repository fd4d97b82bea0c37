"""A vision-language model (LLaVA-1.5 / MiniMind-V): frozen vision tower -> projector -> tinylm LM.

    image -> vision tower (CLIP / SigLIP ViT, frozen) -> patch features (N, P, Dv)
          -> optional k x k average pooling of the patch grid (P -> P / k^2 tokens)
          -> projector: LayerNorm -> Linear -> GELU -> Linear  (N, P', H)
    text "<image>\\nWhat colour?" -> ids with P' copies of <|image_pad|> -> embeddings, whose image-pad
          rows are replaced by the projected patches -> the language model, as for text.

- Liu et al. 2023 ("Visual Instruction Tuning", LLaVA) and Liu et al. 2024 (LLaVA-1.5): patch features
  of the penultimate ViT layer without the CLS token, a two-layer GELU MLP projector, two stages
  (caption alignment with only the projector trained, then visual instruction tuning).
- The LayerNorm in front of the MLP (optional, `projector_norm`) keeps frozen-feature scales from
  different towers in one range; LLaVA has none, so only `projector_norm=false` exports to
  transformers' LlavaForConditionalGeneration (docs/vision.md).
- The image embeddings go in through a forward hook on the LM's input embedding: the LM (tinylm or any
  Hugging Face causal LM, dense or MoE) and its decoders (generate, KV caches) stay unchanged, and
  the scatter is LLaVA's `masked_scatter` over positions whose id is the image-pad token.

The pad token is an added special token, so a user who types `<|image_pad|>` gets plain text
(tinylm/text/special_tokens.py); only the vision data path (tinylm/data/vision_data.py) expands `<image>` into
control tokens, and only when an image is attached.

Saved as a directory: vlm_config.json, projector.safetensors, language_model/ (a normal model
directory), vision_tower/ (a transformers vision model + its image processor), tokenizer files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

IMAGE_PAD = "<|image_pad|>"   # the token whose embeddings are replaced by image features
PLACEHOLDER = "<image>"       # what users and datasets write in message text (LLaVA / MiniMind-V)
VLM_CONFIG = "vlm_config.json"


@dataclass
class VLMSettings:
    """What a saved VLM needs besides its weights.

    Args:
        image_token_id: Id of IMAGE_PAD in the tokenizer (LLaVA's `image_token_index`).
        tokens_per_image: Image-pad tokens one `<image>` expands to (= patches / pool^2).
        feature_layer: Vision tower hidden state fed to the projector (-2 = penultimate, LLaVA-1.5).
        drop_cls: Drop the first (CLS) token of each image (CLIP); SigLIP has none.
        pool: Average-pool k x k patches into one token (1 = keep every patch).
        projector_norm: LayerNorm on the vision features before the MLP.
        vision_hidden: Width of the vision tower's hidden states.
        text_hidden: Width of the language model.
    """

    image_token_id: int
    tokens_per_image: int
    feature_layer: int = -2
    drop_cls: bool = True
    pool: int = 1
    projector_norm: bool = True
    vision_hidden: int = 0
    text_hidden: int = 0


class Projector(nn.Module):
    """Vision features (N, P, Dv) -> LM embeddings (N, P, H). Names follow transformers'
    LlavaMultiModalProjector (linear_1, act, linear_2) so export is a renaming job."""

    def __init__(self, vision_hidden: int, text_hidden: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_hidden) if norm else nn.Identity()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(x))))


def pool_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P, D) patch features on a square grid -> (N, P / k^2, D) by k x k average pooling."""
    if k == 1:
        return x
    n, p, d = x.shape
    g = int(round(p ** 0.5))
    if g * g != p or g % k:
        raise ValueError(f"vision.pool={k}: the {p} patches do not form a square grid divisible by {k}")
    grid = x.transpose(1, 2).reshape(n, d, g, g)                        # (N, D, g, g)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)             # (N, (g/k)^2, D)


def _patch_count(tower: nn.Module) -> tuple[int, bool]:
    """(patch tokens per image, whether the tower prepends a CLS token), by running one blank image."""
    size = tower.config.image_size
    with torch.no_grad():
        n = tower(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state.shape[1]
    grid = (size // tower.config.patch_size) ** 2
    return grid, n == grid + 1


def load_vision_tower(path: str | Path) -> tuple[nn.Module, Any]:
    """(vision model, image processor) from a local directory: a CLIP / SigLIP / SigLIP2 vision model or a
    full dual-encoder checkpoint (its text half is not loaded). Nothing is downloaded."""
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vision.encoder={path}: not a model directory (no config.json); "
                                "point it at a local CLIP/SigLIP directory (`tinylm download`) or build the demo "
                                "tower with `python -m tinylm.posttrain.clip_train`")
    cfg = AutoConfig.from_pretrained(str(path))
    vcfg = getattr(cfg, "vision_config", None) or cfg
    if type(vcfg) not in MODEL_MAPPING:
        raise ValueError(f"vision.encoder={path}: {type(vcfg).__name__} has no transformers vision model class")
    cls = MODEL_MAPPING[type(vcfg)]
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)  # a full CLIP dir: "text_model.* unexpected"
    try:
        tower = cls.from_pretrained(str(path), config=vcfg)
    finally:
        logging.getLogger("transformers").setLevel(level)
    try:
        processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"vision.encoder={path}: no image processor (preprocessor_config.json): {e}") from None
    return tower.float(), processor


class VisionLM(nn.Module):
    """Vision tower + projector + causal LM. Forward takes the LM's arguments plus `pixel_values`
    (N_images, 3, S, S), one per image-pad block, in row-major order of their appearance."""

    def __init__(self, tower: nn.Module, processor: Any, lm: nn.Module, settings: VLMSettings) -> None:
        super().__init__()
        self.vision_tower = tower
        self.projector = Projector(settings.vision_hidden, settings.text_hidden, settings.projector_norm)
        self.language_model = lm
        self.processor = processor
        self.settings = settings
        self.config = lm.config                      # the loop reads num_experts etc. (MoE balancing)
        self._pending: torch.Tensor | None = None     # (n_image_tokens, H) to scatter, during a forward
        self._in_order = False                        # several forwards share _pending (image_features)
        lm.get_input_embeddings().register_forward_hook(self._scatter_images)

    @property
    def generation_config(self) -> Any:
        return getattr(self.language_model, "generation_config", None)

    # -- images -> embeddings
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, tokens_per_image, H) image embeddings in the LM's input space."""
        s = self.settings
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.vision_tower(pixel_values=pixel_values.to(self.projector.linear_1.weight.dtype),
                                    output_hidden_states=True)
            feats = out.hidden_states[s.feature_layer]                  # (N, 1 + P | P, Dv)
            if s.drop_cls:
                feats = feats[:, 1:]
        return self.projector(pool_patches(feats, s.pool))              # (N, P', H)

    def _scatter_images(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of the LM's embedding: image-pad rows <- projected patches (LLaVA's masked_scatter)."""
        feats = self._pending
        is_image = args[0] == self.settings.image_token_id             # (B, T)
        n = int(is_image.sum())
        if n == 0:
            return out
        if feats is None or feats.shape[0] < n or (feats.shape[0] > n and not self._in_order):
            have = 0 if feats is None else feats.shape[0] // self.settings.tokens_per_image
            raise ValueError(f"the input has {n // self.settings.tokens_per_image} image(s) worth of "
                             f"{IMAGE_PAD} tokens but {have} image(s) were given")
        self._pending = feats[n:] if feats.shape[0] > n else None  # consumed: decode steps see text only
        return out.masked_scatter(is_image[..., None], feats[:n].to(out.dtype))

    @contextlib.contextmanager
    def images(self, pixel_values: torch.Tensor | None) -> Iterator[None]:
        """Within the block, the LM's next forward that meets image-pad tokens gets these images."""
        feats = None if pixel_values is None or len(pixel_values) == 0 else self.encode_images(pixel_values)
        with self.image_features(feats):
            yield

    @contextlib.contextmanager
    def image_features(self, feats: torch.Tensor | None, in_order: bool = False) -> Iterator[None]:
        """`images` with the features (N, tokens_per_image, H) already encoded (the inference engine,
        tinylm/inference/vlm_engine.py, encodes the images of several requests in one tower batch).
        in_order: several forwards in the block share them, each taking the next ones its image-pad
        tokens need (a batched prefill split into groups); all must be used by the end of the block."""
        self._pending = None if feats is None or len(feats) == 0 else feats.reshape(-1, self.settings.text_hidden)
        self._in_order = in_order
        try:
            yield
            if in_order and self._pending is not None:
                left = self._pending.shape[0] // self.settings.tokens_per_image
                raise ValueError(f"{left} image(s) were given but had no {IMAGE_PAD} tokens to fill")
        finally:
            self._pending, self._in_order = None, False

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **lm_kwargs: Any) -> Any:
        """The LM's output for input_ids (B, T) with image-pad rows replaced; lm_kwargs go to the LM."""
        with self.images(pixel_values):
            return self.language_model(input_ids=input_ids, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """transformers' generate on the LM; the image-pad token is never sampled."""
        suppress = list(kw.pop("suppress_tokens", None) or []) + [self.settings.image_token_id]
        with self.images(pixel_values):
            return self.language_model.generate(input_ids=input_ids, suppress_tokens=suppress, **kw)

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> pixel_values (N, 3, S, S) through the tower's own image processor."""
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    # -- MoE balancing (the loop calls these when config.num_experts > 0)
    def update_expert_bias(self) -> None:
        self.language_model.update_expert_bias()

    def moe_load_stats(self, reset: bool = True) -> dict[str, list[float]]:
        return self.language_model.moe_load_stats(reset)

    # -- save / load
    def save_pretrained(self, path: str | Path, **_: Any) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from tinylm.models.lora import lora_modules, merged_state_dict

        # LoRA on the LM (stage vlm with lora.enabled): saved merged, a plain LM (the model keeps its adapters)
        merged = merged_state_dict(self.language_model) if any(True for _ in lora_modules(self.language_model)) else None
        self.language_model.save_pretrained(str(path / "language_model"), safe_serialization=True, state_dict=merged)
        self.vision_tower.save_pretrained(str(path / "vision_tower"), safe_serialization=True)
        self.processor.save_pretrained(str(path / "vision_tower"))
        save_file({k: v.detach().contiguous() for k, v in self.projector.state_dict().items()},
                  str(path / "projector.safetensors"))
        (path / VLM_CONFIG).write_text(json.dumps(asdict(self.settings), indent=2) + "\n", encoding="utf-8")


def is_vlm_dir(path: str | Path) -> bool:
    return (Path(path) / VLM_CONFIG).is_file()


def add_image_token(tokenizer: Any) -> int:
    """Add IMAGE_PAD as a special token (no-op if present); returns its id."""
    from tokenizers import AddedToken

    if IMAGE_PAD not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PAD, special=True, normalized=False)], special_tokens=True)
        for attr in ("_tinylm_specials", "_tinylm_special_re"):  # special_tokens.py caches these
            if hasattr(tokenizer, attr):
                delattr(tokenizer, attr)
    return tokenizer.convert_tokens_to_ids(IMAGE_PAD)


def grow_vocab(lm: nn.Module, n: int) -> None:
    """Give the LM at least n token rows; new rows start at the mean embedding (Hewitt 2021: a new
    row near the others keeps the output distribution unchanged). Their input rows never matter
    (image features replace them) and the image-pad token is never a target or sampled."""
    old = lm.get_input_embeddings().weight.shape[0]
    if old >= n:
        return
    with torch.no_grad():
        mean = lm.get_input_embeddings().weight.mean(0)
        lm.resize_token_embeddings(n, mean_resizing=False)
        lm.get_input_embeddings().weight[old:] = mean
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0)


def build_vlm(lm: nn.Module, tokenizer: Any, encoder: str | Path, pool: int = 1, feature_layer: int = -2,
              projector_norm: bool = True, seed: int = 0) -> VisionLM:
    """A new VLM: the vision tower from `encoder` (frozen), a fresh projector, `lm` with IMAGE_PAD added."""
    tower, processor = load_vision_tower(encoder)
    image_id = add_image_token(tokenizer)
    grow_vocab(lm, len(tokenizer))
    grid, has_cls = _patch_count(tower)
    if pool > 1:
        pool_patches(torch.zeros(1, grid, 1), pool)  # validates the grid
    settings = VLMSettings(image_token_id=image_id, tokens_per_image=grid // (pool * pool), feature_layer=feature_layer,
                           drop_cls=has_cls, pool=pool, projector_norm=projector_norm,
                           vision_hidden=tower.config.hidden_size, text_hidden=lm.config.hidden_size)
    torch.manual_seed(seed)
    model = VisionLM(tower, processor, lm, settings)
    model.vision_tower.requires_grad_(False)
    return model


def load_vlm(path: str | Path, device: str | torch.device | None = None) -> tuple[VisionLM, Any]:
    """(VisionLM, tokenizer) from a directory written by `VisionLM.save_pretrained`."""
    from tinylm.models.loading import load_model, load_tokenizer_for

    path = Path(path)
    if not is_vlm_dir(path):
        raise FileNotFoundError(f"{path}: not a tinylm VLM directory (no {VLM_CONFIG})")
    settings = VLMSettings(**json.loads((path / VLM_CONFIG).read_text(encoding="utf-8")))
    tokenizer = load_tokenizer_for(str(path))
    lm, _ = load_model(str(path / "language_model"), dtype="fp32", tokenizer=str(path))
    tower, processor = load_vision_tower(path / "vision_tower")
    model = VisionLM(tower, processor, lm, settings)
    model.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    model.vision_tower.requires_grad_(False)
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != settings.image_token_id:
        raise ValueError(f"{path}: the tokenizer's {IMAGE_PAD} id differs from {VLM_CONFIG}'s image_token_id")
    return (model.to(device) if device is not None else model), tokenizer
