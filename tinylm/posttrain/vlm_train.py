"""The `vlm` training stage: a VisionLM through the one loop (tinylm/train.py).

Stages differ only in data and objective: a VLM batch is a chat batch plus `pixel_values`, and the
loss is the SFT loss (assistant tokens only; image-pad positions never have a target). The two
recipes are this stage with different trainable parts (LLaVA-1.5 / MiniMind-V):

    recipes/vlm_pretrain.yaml  caption alignment: vision.train_lm=none -> only the projector learns
    recipes/vlm_sft.yaml       visual instruction tuning: projector + LM (all, or chosen layers)
    recipes/vlm_sft_lora.yaml  the same with LoRA adapters on the LM (merged into it at save)

The vision tower stays frozen unless vision.train_encoder=true; frozen parameters are excluded
from the optimizer and so stay bit-identical (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinylm.models.vision import VisionLM, build_vlm, is_vlm_dir, load_vlm
from tinylm.training.objectives import LMObjective
from tinylm.training.trainconfig import TrainConfig


def set_trainable(model: VisionLM, train_lm: str, train_encoder: bool) -> None:
    """Freeze per MiniMind-V / LLaVA: projector always trains; LM "none" | "all" | "layers:0,3" (those
    decoder layers only); the vision tower only when train_encoder."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.vision_tower.requires_grad_(train_encoder)
    lm = model.language_model
    if train_lm == "all":
        lm.requires_grad_(True)
    elif train_lm.startswith("layers:"):
        layers = lm.model.layers
        try:
            picked = [int(x) for x in train_lm.split(":", 1)[1].split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"config: vision.train_lm={train_lm!r}: expected layers:I,J,... (integers)") from None
        for i in picked:
            if not -len(layers) <= i < len(layers):
                raise ValueError(f"config: vision.train_lm={train_lm!r}: the LM has {len(layers)} layers")
            layers[i].requires_grad_(True)
    elif train_lm != "none":
        raise ValueError(f"config: vision.train_lm={train_lm!r} not in none | all | layers:I,J,...")


def load_vlm_for_training(cfg: TrainConfig) -> tuple[VisionLM, Any]:
    """(VisionLM, tokenizer): a saved VLM directory, or an LM (preset or directory) + vision.encoder."""
    from tinylm.models.loading import load_model

    v = cfg.vision
    if Path(cfg.model).is_dir() and is_vlm_dir(cfg.model):
        model, tokenizer = load_vlm(cfg.model)
    else:
        if not v.encoder:
            raise ValueError("config: vision.encoder is empty; give a CLIP/SigLIP vision model directory "
                             "(or set model to a saved VLM directory)")
        lm, tokenizer = load_model(cfg.model, dtype="fp32", tokenizer=cfg.tokenizer or None, seed=cfg.seed)
        model = build_vlm(lm, tokenizer, v.encoder, pool=v.pool, feature_layer=v.feature_layer,
                          projector_norm=v.projector_norm, seed=cfg.seed)
    set_trainable(model, v.train_lm, v.train_encoder)
    if cfg.lora.enabled:
        add_lm_lora(model, cfg)
    return model, tokenizer


def add_lm_lora(model: VisionLM, cfg: TrainConfig) -> None:
    """LoRA adapters (Hu et al. 2021) on the language model only, the projector still trained in full:
    MiniMind-V's "projector + LM" SFT at a fraction of the trainable LM weights. The tower's own
    q_proj/k_proj/... are never adapted. VisionLM.save_pretrained writes the LM merged (W + alpha/r B A),
    so the saved VLM is a plain one: chat, serve and export load it as any other."""
    from tinylm.models.lora import apply_lora

    if cfg.vision.train_lm != "none":
        raise ValueError(f"config: lora.enabled with vision.train_lm={cfg.vision.train_lm!r}: LoRA trains adapters "
                         "on a frozen LM; set vision.train_lm=none (recipes/vlm_sft_lora.yaml)")
    if cfg.lora.quantize != "none":
        raise ValueError("config: lora.quantize=nf4 (QLoRA) with stage=vlm is not supported yet; use lora.quantize=none")
    apply_lora(model.language_model, cfg.lora)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    for attr in ("_orig_mod", "module"):  # torch.compile, then DDP
        model = getattr(model, attr, model)
    return model


class VisionObjective(LMObjective):
    """Assistant-token cross-entropy on image+text conversations (the SFT loss, with pixels)."""

    data_kind = "chat"
    chat = True

    def setup(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, device: torch.device) -> None:
        super().setup(model, tokenizer, cfg, device)
        vlm = _unwrap(model)
        self.settings, self.processor = vlm.settings, vlm.processor
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._rows: dict[str, list] = {}

    def rows(self, path: str) -> list:
        from tinylm.data.vision_data import load_rows

        if path not in self._rows:
            self._rows[path] = load_rows(path, self.tokenizer, self.settings.tokens_per_image,
                                         self.settings.image_token_id, self.cfg.seq_len, self.cfg.data.skip_invalid)
        return self._rows[path]

    def batches(self, split: str, rank: int = 0, world_size: int = 1) -> Any:
        from tinylm.data.vision_data import VLMBatches, one_pass

        cfg = self.cfg
        if split == "train":
            return VLMBatches(self.rows(cfg.data.train), cfg.batch_size, self.pad_id, self.processor, cfg.seed,
                              rank, world_size)
        return one_pass(self.rows(cfg.data.val), cfg.batch_size, self.pad_id, self.processor, rank, world_size)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Any, dict]:
        from tinylm.models.model import TinyLMForCausalLM

        labels = batch["labels"]
        n_tokens = (labels[:, 1:] != -100).sum()
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch.get("pixel_values"), "use_cache": False}
        lm = _unwrap(model).language_model
        if isinstance(model, VisionLM) and isinstance(lm, TinyLMForCausalLM):
            return supervised_ce(model, lm, batch, n_tokens)
        if isinstance(lm, TinyLMForCausalLM):  # wrapped (DDP / compile): fused lm_head + CE on all rows
            out = model(**kw, labels=labels, num_items_in_batch=n_tokens.clamp(min=1), return_logits=False)
            metrics = {"aux_loss": out.aux_loss.detach()} if out.aux_loss.requires_grad else {}
            return out.loss * n_tokens, n_tokens, metrics
        out = model(**kw)
        logits = out.logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
        return ce, n_tokens, {}


def supervised_ce(model: VisionLM, lm: Any, batch: dict[str, Any], n_tokens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed CE of a tinylm LM over the supervised positions only: a VQA row has ~3 answer tokens
    among ~40 (image + question), so the lm_head + CE (a third of the tiny LM's FLOPs) runs on ~8%
    of the rows. Same value as the LM's own loss (tested)."""
    from tinylm.models.model import linear_cross_entropy_sum

    targets = batch["labels"][:, 1:]                                   # (B, T-1): position t predicts t+1
    with model.images(batch.get("pixel_values")):
        hidden, aux = lm.model(batch["input_ids"], batch["attention_mask"])   # (B, T, H)
    keep = targets != -100
    h = hidden[:, :-1][keep]                                           # (n_supervised, H)
    ce = linear_cross_entropy_sum(h, lm.lm_head.weight, targets[keep])
    metrics = {"aux_loss": aux.detach()} if aux.requires_grad else {}
    return ce + aux * n_tokens, n_tokens, metrics
