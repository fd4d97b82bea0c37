"""Reward models: a causal LM with a scalar head, trained on preference pairs (stage `reward`).

Classic RLHF (Christiano et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT) first fits
a reward model r(x, y) to human comparisons, then optimises the policy against it with PPO
(tinylm/posttrain/ppo.py). The reward model is the language model with its vocabulary head replaced by one
linear `score` layer (hidden -> 1) read at the **last non-pad token** of prompt + answer, exactly
what transformers' `*ForSequenceClassification` classes do, so an exported tinylm reward model
gives the same scores in plain transformers (`tinylm export RM_DIR`, tests/test_reward.py).

Loss (Bradley-Terry, as InstructGPT eq. 1 and TRL's RewardTrainer), per pair:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)  [+ c * (r_chosen + r_rejected)^2]

the optional second term (`reward.center_rewards_coefficient`, Eisenstein et al. 2023) keeps the
rewards centred on 0 (the BT loss only sees differences). Data: the preference files DPO reads
(tinylm.data.formats, encoded once by `dpo.load_pairs`). Held-out pairwise accuracy and margin are logged
as `val_accuracy` / `val_margin` at every validation, next to the accuracy of a length-only baseline
("the longer answer wins"), the number a reward model must beat to have learned anything but length.

Saved files: the usual model directory plus the `score.weight` tensor (and `num_labels: 1`,
`pad_token_id` in config.json). `load_reward_model(dir)` reads it back; a directory without a score
head is an error. With `lora.enabled` the run's final/ holds the adapter and the head is written to
`score_head.safetensors` next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SCORE_KEY = "score.weight"
HEAD_FILE = "score_head.safetensors"  # LoRA runs: the head next to the adapter


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry losses. chosen, rejected, margin: (B,) -> (B,)."""
    d = chosen - rejected
    if margin is not None:
        d = d - margin
    losses = -F.logsigmoid(d)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) -> (B,) index of the rightmost token that is not `pad_id` (transformers' rule)."""
    pos = torch.arange(input_ids.size(1), device=input_ids.device)
    return (pos * (input_ids != pad_id).long()).argmax(-1)


def trunk_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) of a tinylm or transformers causal LM, without the vocab head."""
    if getattr(model.config, "model_type", "") == "tinylm":
        return model.model(input_ids, attention_mask)[0]
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def add_score_head(model: torch.nn.Module, pad_id: int, name: str = "score") -> torch.nn.Linear:
    """Attach a trainable hidden -> 1 linear head (no bias, as transformers) as `model.<name>`."""
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, 1, bias=False)
    std = getattr(model.config, "initializer_range", 0.02)
    torch.nn.init.normal_(head.weight, std=std)
    p = next(model.parameters())
    setattr(model, name, head.to(device=p.device, dtype=torch.float32))
    if name == "score":
        model.config.num_labels = 1          # AutoModelForSequenceClassification reads a (1, H) score
        model.config.pad_token_id = pad_id   # ... and scores the last non-pad token
    return head


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pad_id: int, head: torch.nn.Module | None = None) -> torch.Tensor:
    """(B, T) -> (B,) scalar rewards at the last non-pad token."""
    head = head if head is not None else model.score
    h = trunk_hidden(model, input_ids, attention_mask)                       # (B, T, H)
    idx = last_token_index(input_ids, pad_id)                                # (B,)
    last = h[torch.arange(h.size(0), device=h.device), idx]                  # (B, H)
    return head(last.to(head.weight.dtype)).squeeze(-1).float()             # (B,)


def length_baseline_accuracy(pairs: list[dict]) -> float:
    """Pairwise accuracy of "the answer with more tokens wins" (ties count half)."""
    score = 0.0
    for p in pairs:
        c, r = sum(p["chosen_mask"]), sum(p["rejected_mask"])
        score += 1.0 if c > r else 0.5 if c == r else 0.0
    return score / max(len(pairs), 1)


@torch.no_grad()
def pair_metrics(model: torch.nn.Module, pairs: list[dict], pad_id: int, batch_size: int = 16,
                 head: torch.nn.Module | None = None) -> dict[str, float]:
    """Held-out BT loss, pairwise accuracy (ties count half) and mean margin over `pairs`."""
    from tinylm.posttrain.dpo import collate_pairs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss = acc = margin = 0.0
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i:i + batch_size], pad_id)
        r = sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device), pad_id, head)
        n = r.numel() // 2
        d = r[:n] - r[n:]
        loss += bt_loss(r[:n], r[n:]).sum().item()
        acc += ((d > 0).float() + 0.5 * (d == 0).float()).sum().item()
        margin += d.sum().item()
    model.train(was_training)
    n = max(len(pairs), 1)
    return {"loss": loss / n, "accuracy": acc / n, "margin": margin / n}


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded random `fraction` of the pairs is held out (at least 1, not all)."""
    if not 0 < fraction < 1:
        raise ValueError(f"config: reward.val_fraction must be in (0, 1) when data.val is empty, got {fraction}")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(fraction * len(pairs))), len(pairs) - 1)
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# -- loading a trained reward model ------------------------------------------------------------------

def read_score_head(model_dir: str | Path) -> torch.Tensor | None:
    """The (1, H) `score.weight` saved in a model dir (or its LoRA head file), or None."""
    from safetensors import safe_open

    d = Path(model_dir)
    files = [d / HEAD_FILE, d.parent / HEAD_FILE] if (d / "adapter_config.json").exists() else sorted(
        d.glob("*.safetensors"))
    for f in files:
        if f.is_file():
            with safe_open(str(f), framework="pt") as st:
                if SCORE_KEY in st.keys():
                    return st.get_tensor(SCORE_KEY).float()
    return None


def load_reward_model(model_dir: str | Path, device: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model with `.score`, tokenizer) from a reward-model dir. Bad input raises one clear ValueError:
    no score head, or (when `tokenizer` is given) a different vocabulary than the policy's."""
    from tinylm.models.loading import load_model

    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such reward model directory")
    head = read_score_head(d)
    if head is None:
        raise ValueError(f"{d}: no reward score head ({SCORE_KEY} with shape (1, hidden)) in its weights; "
                         "train one with `tinylm train recipes/reward.yaml` (stage: reward)")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the causal-LM class reports score.weight as unexpected: we read it below
    try:
        model, tok = load_model(str(d), dtype="fp32", device=device)
    finally:
        hf_logging.set_verbosity(level)
    if head.shape != (1, model.config.hidden_size):
        raise ValueError(f"{d}: {SCORE_KEY} has shape {tuple(head.shape)}, expected (1, {model.config.hidden_size})")
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, tok, str(d))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    add_score_head(model, pad_id).weight.data.copy_(head)
    model.eval().requires_grad_(False)
    return model, tok


def check_same_tokenizer(policy_tok: Any, rm_tok: Any, where: str) -> None:
    """The reward model must read the policy's tokens and chat format: equal vocabularies, else ValueError."""
    a, b = policy_tok.get_vocab(), rm_tok.get_vocab()
    if a != b:
        only_p, only_r = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        moved = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
        raise ValueError(f"{where}: tokenizer mismatch with the policy ({len(b)} vs {len(a)} tokens; {only_r} only in "
                         f"the reward model, {only_p} only in the policy, {moved} with other ids); train the reward "
                         "model from the policy's base so both share one tokenizer and chat template")


class RewardModelScorer:
    """A reward function (GRPO/PPO signature) backed by a reward model: scores prompt + completion text
    rendered with the chat template, exactly as the pairs were encoded in training."""

    __name__ = "reward_model"

    def __init__(self, model_dir: str, policy_tokenizer: Any, device: Any = None, max_len: int = 512,
                 allow_special_tokens: bool | list[str] = False, batch_size: int = 16) -> None:
        from tinylm.text.special_tokens import resolve_allow

        self.model, self.tok = load_reward_model(model_dir, device, policy_tokenizer)
        self.allow = resolve_allow(self.tok, allow_special_tokens)  # as data.allow_special_tokens in training
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.max_len, self.batch_size = max_len, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        from tinylm.posttrain.dpo import collate_pairs
        from tinylm.text.chat_format import encode_preference

        rows = []
        for p, c in zip(prompts, completions):
            ids, mask = encode_preference(self.tok, [{"role": "user", "content": p}],
                                          [{"role": "assistant", "content": c or " "}], self.max_len, self.allow)
            rows.append({"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids, "rejected_mask": mask})
        out: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(rows), self.batch_size):
            b = collate_pairs(rows[i:i + self.batch_size], self.pad_id)
            n = len(rows[i:i + self.batch_size])
            ids, attn = b["input_ids"][:n].to(device), b["attention_mask"][:n].to(device)
            out += sequence_rewards(self.model, ids, attn, self.pad_id).tolist()
        return out


# -- objective ----------------------------------------------------------------------------------------

class RewardObjective:
    """Stage `reward`: loss_sum = sum of per-pair BT losses, n_items = pairs. Single process."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def setup(self, model: torch.nn.Module, tokenizer: Any, cfg: Any, device: torch.device) -> None:
        from tinylm.posttrain.dpo import load_pairs

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("config: stage reward runs in one process (no torchrun)")
        self.cfg, self.tokenizer, self.net = cfg, tokenizer, model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        load = lambda path: load_pairs(path, tokenizer, cfg.seq_len, cfg.data.skip_invalid,  # noqa: E731
                                       cfg.data.allow_special_tokens)
        train = load(cfg.data.train)
        if cfg.data.val:
            self.train_pairs, self.val_pairs = train, load(cfg.data.val)
        else:
            self.train_pairs, self.val_pairs = split_pairs(train, cfg.reward.val_fraction, cfg.seed)
        self.length_acc = length_baseline_accuracy(self.val_pairs)
        torch.manual_seed(cfg.seed)
        add_score_head(model, self.pad_id)
        print(f"reward: {len(self.train_pairs)} training pairs, {len(self.val_pairs)} held out "
              f"(length-only baseline accuracy {self.length_acc:.3f})", file=sys.stderr)

    def batches(self, split: str, rank: int = 0, world_size: int = 1) -> Any:
        from tinylm.posttrain.dpo import RowIterator, collate_pairs

        pairs = self.train_pairs if split == "train" else self.val_pairs
        it = RowIterator(pairs, self.cfg.batch_size, lambda rows: collate_pairs(rows, self.pad_id), rank,
                         world_size, self.cfg.seed, shuffle=split == "train")
        return it if split == "train" else (next(it) for _ in range(len(it)))

    def sample_ids(self, text: str) -> list[int]:
        from tinylm.text.chat_format import render_prompt

        return list(render_prompt(self.tokenizer, [{"role": "user", "content": text}]))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        ids, attn = batch["input_ids"], batch["attention_mask"]               # (2B, T): chosen, then rejected
        r = sequence_rewards(self.net, ids, attn, self.pad_id)                # (2B,)
        b = ids.size(0) // 2
        losses = bt_loss(r[:b], r[b:], center_coef=self.cfg.reward.center_rewards_coefficient)
        d = (r[:b] - r[b:]).detach()
        metrics = {"accuracy": (d > 0).float().mean().item(), "margin": d.mean().item(),
                   "rewards/chosen": r[:b].mean().item(), "rewards/rejected": r[b:].mean().item()}
        return losses.sum(), b, metrics

    def validation_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out loss / accuracy / margin (and the length baseline); saves the head of a LoRA run."""
        m = pair_metrics(self.net, self.val_pairs, self.pad_id, max(self.cfg.batch_size, 8))
        if getattr(self.net, "lora_settings", None) is not None:
            save_head(self.net, Path(self.cfg.out_dir) / HEAD_FILE)
        out = {"val_accuracy": m["accuracy"], "val_margin": m["margin"],
               "val_length_baseline_accuracy": self.length_acc}
        if not self.cfg.data.val:  # the loop's val_loss needs data.val; the held-out split is ours
            out["val_loss"] = m["loss"]
        return out


def save_head(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({SCORE_KEY: model.score.weight.detach().float().cpu().contiguous()}, str(tmp))
    tmp.replace(path)
