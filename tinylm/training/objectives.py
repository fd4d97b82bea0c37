"""Training objectives: what a stage optimises. The loop in train.py is the same for all of them.

A stage = a kind of data + an objective. An objective is any object with these methods:

    setup(model, tokenizer, cfg, device) -> None
        Called once after the model is built (and adapters applied), before the optimizer.
        Load extra models here (DPO reference, distillation teacher), precompute token ids, ...
    batches(split, rank, world_size) -> iterator of dict[str, Tensor] (CPU tensors)
        split is "train" (endless, shuffled, this rank's shard, resumable: the iterator has
        `state_dict()` / `load_state_dict()` holding plain values) or "val" (one ordered pass).
    loss(model, batch) -> (loss_sum: Tensor, n_items: int | Tensor, metrics: dict[str, float | Tensor])
        loss_sum is the SUM of per-item losses of this micro-batch (items = supervised tokens for
        LM losses, pairs for DPO, completions for GRPO ...). The loop adds loss_sum over the
        micro-batches of one optimizer step and divides by the total n_items of that step across
        all micro-batches and all ranks, so the gradient is exactly that of one big batch
        (token-level normalisation; HF's `num_items_in_batch` fix, Unsloth/HF blog 2024).
        `model` may be wrapped (DDP / torch.compile): call it, do not read attributes from it.
        metrics: extra scalars averaged over micro-batches and logged (e.g. "aux_loss", "rewards/margins").
    sample_ids(text) -> list[int]
        Token ids of one `sample_prompts` entry (raw text for pretraining, chat-formatted otherwise).
    validation_metrics(model) -> dict[str, float]   (optional)
        Extra validation numbers, logged on rank 0 as a row of their own at every validation
        (e.g. GRPO's held-out reward `val_reward`, where a validation loss means nothing).

Plugging in a new stage (how dpo / distill / reason / grpo are added):
  1. write the objective class in its own module (e.g. tinylm/posttrain/dpo.py `class DPOObjective`),
     usually subclassing `LMObjective` to reuse data loading and sampling;
  2. add its name to `trainconfig.STAGES` and, if it has settings, a sub-dataclass in trainconfig.py;
  3. add one `if stage == ...` branch to `train.make_objective` (the loop depends on the stages,
     never the other way round).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tinylm.training.trainconfig import TrainConfig


class Objective(Protocol):
    """The interface the training loop relies on (see the module docstring)."""

    def setup(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, device: torch.device) -> None: ...

    def batches(self, split: str, rank: int = 0, world_size: int = 1) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any, dict]: ...

    def sample_ids(self, text: str) -> list[int]: ...


def lm_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Forward inputs of a batch. Packed SFT rows carry position_ids that restart at each
    conversation: tinylm turns a restart into a block-diagonal causal mask (each conversation sees
    only itself). Other transformers models honour that only without an attention mask, so for them
    the position_ids are left out and packed conversations share attention (plain packing)."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if batch.get("position_ids") is not None and _is_tinylm(model):
        kw["position_ids"] = batch["position_ids"]
    return kw


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed next-token cross-entropy over supervised targets, for any HF causal LM.

    batch: input_ids (B, T), labels (B, T) unshifted with -100 on unsupervised positions,
    optional attention_mask (B, T). Returns (ce_sum, n_tokens, model output).
    We compute CE from the logits ourselves so the sum/count split works for every model.
    """
    out = model(**lm_inputs(model, batch), use_cache=False)
    logits = out.logits[:, :-1]                          # (B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]                     # (B, T-1)
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                             ignore_index=-100, reduction="sum")
    return ce_sum, (targets != -100).sum(), out


class LMObjective:
    """Next-token prediction. Pretraining: every token is a target; SFT: only assistant tokens.

    The difference between the two lives in the data (the loss mask written by `tinylm data
    prepare` becomes -100 labels), so one objective serves both; `chat` switches data kind and
    prompt formatting. A MoE model's balance loss (`aux_loss`, already times its coefficient,
    a per-batch mean) is added once per supervised token, so after the loop's division it
    contributes its token-weighted mean over the micro-batches.
    """

    data_kind = "pretrain"
    chat = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer: Any = None
        self.device = torch.device("cpu")

    def setup(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, device: torch.device) -> None:
        self.tokenizer, self.cfg, self.device = tokenizer, cfg, device

    def batches(self, split: str, rank: int = 0, world_size: int = 1) -> Any:
        return token_batches(self.cfg, self.tokenizer, self.data_kind, split, rank, world_size)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any, dict]:
        if _is_tinylm(model):  # fused chunked lm_head + CE, no (B, T, V) logits (docs/performance.md)
            n_tokens = (batch["labels"][:, 1:] != -100).sum()
            out = model(**lm_inputs(model, batch), use_cache=False, labels=batch["labels"], num_items_in_batch=n_tokens.clamp(min=1), return_logits=False)
            fused_metrics = {"aux_loss": out.aux_loss.detach()} if out.aux_loss.requires_grad else {}
            if getattr(out, "mtp_losses", None) is not None:  # multi-token prediction, per depth (mtp.py)
                fused_metrics.update({f"mtp_loss_{k + 1}": v for k, v in enumerate(out.mtp_losses)})
            return out.loss * n_tokens, n_tokens, fused_metrics  # = ce_sum + aux * n_tokens
        ce_sum, n_tokens, out = causal_lm_loss_sum(model, batch)
        metrics: dict[str, Any] = {}
        aux = getattr(out, "aux_loss", None)
        if aux is not None and aux.requires_grad:
            ce_sum = ce_sum + aux * n_tokens
            metrics["aux_loss"] = aux.detach()
        return ce_sum, n_tokens, metrics

    def sample_ids(self, text: str) -> list[int]:
        if self.chat:
            from tinylm.text.chat_format import render_prompt
            return list(render_prompt(self.tokenizer, [{"role": "user", "content": text}]))
        from tinylm.text.special_tokens import encode_text
        return encode_text(self.tokenizer, text)


def _is_tinylm(model: torch.nn.Module) -> bool:
    """True for a (torch.compile / DDP wrapped) TinyLMForCausalLM, whose forward has return_logits."""
    from tinylm.models.model import TinyLMForCausalLM

    for attr in ("_orig_mod", "module"):  # torch.compile, then DDP
        model = getattr(model, attr, model)
    return isinstance(model, TinyLMForCausalLM)


class SFTObjective(LMObjective):
    """Supervised fine-tuning on chat data: loss only on assistant tokens (mask from the data)."""

    data_kind = "chat"
    chat = True


def token_batches(cfg: TrainConfig, tokenizer: Any, kind: str, split: str, rank: int, world_size: int) -> Any:
    """Batches of input_ids / labels / attention_mask from `data.train` (endless, shuffled, resumable)
    or `data.val` (one ordered pass). Raw .jsonl/.txt files are prepared once into a cache."""
    from tinylm.data.dataset import BatchIterator, load_token_dataset

    path = cfg.data.train if split == "train" else cfg.data.val
    ds = load_token_dataset(path, tokenizer=tokenizer, kind=kind, seq_len=cfg.seq_len, pack=cfg.data.packing,
                            skip_invalid=cfg.data.skip_invalid, workers=max(1, cfg.num_workers),
                            allow_special_tokens=cfg.data.allow_special_tokens)
    if split == "train":
        return BatchIterator(ds, cfg.batch_size, cfg.seq_len, rank=rank, world_size=world_size, seed=cfg.seed)
    return _one_pass(ds, cfg.batch_size, cfg.seq_len, rank, world_size)


def _one_pass(ds: Any, batch_size: int, seq_len: int, rank: int, world_size: int) -> Any:
    """Every row once, in order; rank r takes rows r::world_size of each global batch."""
    from tinylm.data.dataset import collate

    gb = batch_size * world_size
    for start in range(0, len(ds) - world_size + 1, gb):  # every rank gets >= 1 row per batch
        rows = list(range(start, min(start + gb, len(ds))))[rank::world_size]
        yield collate(ds, rows, seq_len)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens in a batch (all attention masks, or all input ids when unpadded)."""
    if isinstance(batch.get("n_tokens"), int):
        return batch["n_tokens"]
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids")))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def apply_adapters(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """LoRA / QLoRA hook: freezes the model and adds adapters when cfg.lora.enabled (tinylm/models/lora.py)."""
    if cfg.lora.enabled and cfg.stage != "vlm":  # vlm: adapters on its LM only (tinylm/posttrain/vlm_train.py)
        from tinylm.models.lora import apply_lora, check_base_model  # post-training module
        check_base_model(cfg.model)  # a preset is re-drawn on every load: the adapter would lose its base
        model = apply_lora(model, cfg.lora)
        model.lora_settings["base_model"] = cfg.model  # written to adapter_config.json
    return model


def rebuilt_with_state(full: dict[str, torch.Tensor], model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """A fresh fp32 model of the run's recipe (base model + adapters if LoRA) holding `full`, a
    gathered state dict of a sharded model (FSDP2 or DeepSpeed ZeRO-3), for an ordinary save."""
    from tinylm.models.loading import load_model

    copy, _ = load_model(cfg.model, dtype="fp32", tokenizer=cfg.tokenizer or None, seed=cfg.seed)
    copy = apply_adapters(copy, cfg)
    copy.load_state_dict(full)
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = model.generation_config
    return copy
