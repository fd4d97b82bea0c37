"""Direct Preference Optimization (Rafailov et al. 2023, "Your Language Model is Secretly a Reward Model").

Given a prompt x, a preferred answer y_w and a worse one y_l, DPO trains the policy pi directly,
without a reward model, using the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)):

    sigmoid (DPO):  -log sigmoid(beta * d),   d = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
      with label smoothing eps (conservative DPO, Mitchell 2023):
                    -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    ipo (Azar et al. 2023): (d_avg - 1/(2 beta))^2, with per-token averaged log-ratios (as TRL does)
    hinge (SLiC, Zhao et al. 2023): relu(1 - beta d)

log pi(y|x) is the SUM of the answer tokens' log-probs (prompt tokens are not scored).
The reference pi_ref is frozen: a copy of the starting model, a model directory
(`dpo.ref_model`), precomputed log-probs stored with the data, or - when training LoRA - the same
network with its adapters switched off (no copy). Precomputing (as TRL's
`precompute_ref_log_probs`) saves the reference's memory and one forward pass per step:

    python -m tinylm.posttrain.dpo precompute --model runs/reason/final --data pairs.jsonl --out pairs_ref.jsonl --seq-len 128

adds `ref_chosen_logps` / `ref_rejected_logps` (floats) to every row; a training file whose rows
all have them loads no reference model. Use the training run's seq_len (it decides truncation).

Logged like TRL: rewards/chosen, rewards/rejected (beta * log-ratio), rewards/margins,
rewards/accuracies (fraction of pairs with chosen reward > rejected reward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the scored tokens of each row.

    logits (B, T, V) from the model on input_ids (B, T); loss_mask (B, T) is 1 on answer tokens
    (aligned with input_ids, i.e. the token being predicted). Returns (B,) float32.
    """
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (B, T-1, V)
    tok = torch.gather(logp, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (tok * loss_mask[:, 1:].to(tok.dtype)).sum(-1)               # (B,)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    All log-prob inputs are (B,) sums over answer tokens. `chosen_lengths` / `rejected_lengths`
    (B,) token counts are needed by "ipo" only. Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)); rewards are detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    d = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo loss needs chosen_lengths and rejected_lengths")
        d_avg = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (d_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's logged DPO metrics (means over the pairs of the micro-batch)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


# -- reference model ----------------------------------------------------------------------------

class ReferenceModel:
    """The frozen pi_ref, whichever way it is obtained (also used by GRPO's KL term).

    - `path` given: load that model, frozen;
    - the policy has LoRA adapters: run the policy itself with adapters disabled (no copy);
    - otherwise: a frozen deep copy of the starting policy.
    Call it like a model: `ref(input_ids, attention_mask=...)` -> logits (no grad).
    """

    def __init__(self, model, cfg=None, device=None, path: str = "") -> None:
        import copy

        self.policy, self.model, self.adapter_ctx = model, None, None
        if path:
            from tinylm.models.loading import load_model

            self.model, _ = load_model(path, device=device)
        elif _has_adapters(model):
            self.adapter_ctx = _adapter_disabler(model)
        else:
            self.model = copy.deepcopy(model)
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.model is not None:
            return self.model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        was_training = self.policy.training
        self.policy.eval()  # no adapter dropout in the reference pass
        try:
            with self.adapter_ctx():
                return self.policy(input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            self.policy.train(was_training)


def _has_adapters(model) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def _adapter_disabler(model):
    """Context-manager factory that switches LoRA adapters off (tinylm.models.lora or PEFT)."""
    if hasattr(model, "disable_adapter"):  # PEFT PeftModel
        return model.disable_adapter
    try:
        from tinylm.models.lora import disable_adapters
    except ImportError as e:
        raise ValueError("LoRA policy without tinylm.models.lora.disable_adapters: set dpo.ref_model to a model dir") from e
    return lambda: disable_adapters(model)


# -- data ----------------------------------------------------------------------------------------

def encode_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_len: int,
                where: str = "", allow: frozenset[str] = frozenset()) -> dict[str, list[int]]:
    """Token ids and answer masks of one preference pair (chat template applied; special-token strings
    in the text stay plain text unless in `allow`)."""
    from tinylm.text.chat_format import encode_preference

    c_ids, c_mask = encode_preference(tokenizer, prompt, chosen, max_len, allow)
    r_ids, r_mask = encode_preference(tokenizer, prompt, rejected, max_len, allow)
    if not any(c_mask) or not any(r_mask):
        raise ValueError(f"{where}: the prompt fills all {max_len} tokens (seq_len); no answer token left "
                         "to score - raise seq_len or shorten the prompt")
    return {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask}


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def ref_columns(path: str) -> dict[int, tuple[float, float]]:
    """line -> (ref_chosen_logps, ref_rejected_logps) for the rows of a preference file that have them.

    A row with only one of the two, or a value that is not a finite number, is an error naming file:line.
    """
    import json
    import math

    from tinylm.data.formats import iter_raw

    out = {}
    for line, raw, _ in iter_raw(path):
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                continue  # reported by iter_records
        if not isinstance(raw, dict) or not any(k in raw for k in REF_COLUMNS):
            continue
        vals = [raw.get(k) for k in REF_COLUMNS]
        for k, v in zip(REF_COLUMNS, vals):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{path}:{line}: field {k!r}: must be a finite number (the reference model's summed "
                                 f"answer log-prob), got {v!r}")
        out[line] = (float(vals[0]), float(vals[1]))
    return out


def load_pairs(path: str, tokenizer, max_len: int, skip_invalid: bool = False,
               allow_special_tokens: bool | list[str] = False) -> list[dict[str, list[int]]]:
    """Read and encode a preference file (any format of tinylm.data.formats; errors name file:line).

    Rows with precomputed reference log-probs (`ref_chosen_logps` / `ref_rejected_logps`) keep them
    as floats in the pair; a file must have them on every row or on none.
    """
    import sys

    from tinylm.data.formats import iter_records
    from tinylm.text.special_tokens import resolve_allow

    allow = resolve_allow(tokenizer, allow_special_tokens)
    refs = ref_columns(path)
    pairs, too_long = [], 0
    for r in iter_records(path, kind="preference", skip_invalid=skip_invalid):
        try:
            pair = encode_pair(tokenizer, r.prompt, r.chosen, r.rejected, max_len, f"{r.source}:{r.line}", allow)
        except ValueError:
            too_long += 1  # the prompt alone fills seq_len: nothing to compare
            continue
        if refs:
            if r.line not in refs:
                raise ValueError(f"{path}:{r.line}: no {REF_COLUMNS[0]}/{REF_COLUMNS[1]}, but other rows have them: "
                                 "precompute them for every row (python -m tinylm.posttrain.dpo precompute) or for none")
            pair[REF_COLUMNS[0]], pair[REF_COLUMNS[1]] = refs[r.line]
        pairs.append(pair)
    if too_long:
        print(f"warning: {path}: skipped {too_long} pairs whose prompt fills seq_len={max_len}", file=sys.stderr)
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs (raise seq_len?)")
    return pairs


def collate_pairs(rows: list[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> input_ids / attention_mask / loss_mask of shape (2B, T): chosen rows, then rejected."""
    seqs = [(r["chosen_ids"], r["chosen_mask"]) for r in rows] + [(r["rejected_ids"], r["rejected_mask"]) for r in rows]
    t = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1, torch.tensor(m)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}
    if rows and REF_COLUMNS[0] in rows[0]:  # precomputed reference log-probs, same (2B,) order
        batch["ref_logps"] = torch.tensor([r[REF_COLUMNS[0]] for r in rows] + [r[REF_COLUMNS[1]] for r in rows],
                                          dtype=torch.float32)
    return batch


class RowIterator:
    """Endless, seeded, resumable batches over an in-memory list of rows (DDP: rank r takes r::world).

    Used for preference pairs (DPO) and prompts (GRPO), which are small enough to keep encoded in
    memory. State is (epoch, position), so a resumed run sees the same future batches.
    """

    def __init__(self, rows: list, batch_size: int, collate, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("no training rows")
        self.rows, self.batch_size, self.collate = rows, batch_size, collate
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return max(1, len(self.rows) // (self.batch_size * self.world))

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        gb = self.batch_size * self.world
        order = self._order()
        idx = [order[i % len(order)] for i in range(self.position * gb, (self.position + 1) * gb)]
        self.position += 1
        return self.collate([self.rows[i] for i in idx[self.rank::self.world]])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


# -- objective ------------------------------------------------------------------------------------

class DPOObjective:
    """Stage `dpo` for tinylm's trainer: loss_sum = sum of per-pair losses, n_items = pairs.

    Data: any preference format of tinylm.data.formats (`data.train`, optional `data.val`); pairs are
    encoded once with the chat template and kept in memory.
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def setup(self, model, tokenizer, cfg, device) -> None:
        d = cfg.dpo
        if d.loss_type not in LOSS_TYPES:
            raise ValueError(f"config: dpo.loss_type={d.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if d.beta <= 0:
            raise ValueError(f"config: dpo.beta must be > 0, got {d.beta}")
        if not 0 <= d.label_smoothing < 0.5:
            raise ValueError(f"config: dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.beta, self.loss_type, self.ls = d.beta, d.loss_type, d.label_smoothing
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Pairs are read now: when every file carries precomputed reference log-probs, no reference
        # model is built (the copy would cost a second model in memory and a forward per step).
        self.pairs = {split: load_pairs(path, tokenizer, cfg.seq_len, cfg.data.skip_invalid,
                                        cfg.data.allow_special_tokens)
                      for split, path in (("train", cfg.data.train), ("val", cfg.data.val)) if path}
        precomputed = [REF_COLUMNS[0] in p[0] for p in self.pairs.values()]
        if all(precomputed) and d.ref_model:
            raise ValueError(f"config: dpo.ref_model={d.ref_model!r} but the data already has precomputed "
                             f"{REF_COLUMNS[0]}/{REF_COLUMNS[1]}; drop one of the two")
        self.ref = None if all(precomputed) else ReferenceModel(model, cfg, device, path=d.ref_model)

    def batches(self, split: str, rank: int = 0, world_size: int = 1):
        pairs = self.pairs[split]
        it = RowIterator(pairs, self.cfg.batch_size, lambda rows: collate_pairs(rows, self.pad_id), rank,
                         world_size, self.cfg.seed, shuffle=split == "train")
        if split == "train":
            return it
        return (next(it) for _ in range(len(it)))

    def sample_ids(self, text: str) -> list[int]:
        from tinylm.text.chat_format import render_prompt

        return list(render_prompt(self.tokenizer, [{"role": "user", "content": text}]))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]  # (2B, T)
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        logps = sequence_logps(out.logits, ids, mask)                    # (2B,)
        if "ref_logps" in batch:                                         # precomputed with the data
            ref_logps = batch["ref_logps"].to(logps.dtype)
        else:
            ref_logps = sequence_logps(self.ref(ids, attn), ids, mask)  # (2B,)
        b = ids.size(0) // 2
        lengths = mask[:, 1:].sum(-1).float()
        losses, cr, rr = dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], self.beta, self.loss_type,
                                  self.ls, lengths[:b], lengths[b:])
        metrics = preference_metrics(cr, rr)
        metrics["logps/chosen"] = logps[:b].mean().item()
        metrics["logps/rejected"] = logps[b:].mean().item()
        loss_sum = losses.sum()
        aux = getattr(out, "aux_loss", None)
        if aux is not None and aux.requires_grad:
            loss_sum = loss_sum + aux * b  # MoE balance loss, per pair
        return loss_sum, b, metrics


# -- precomputed reference log-probs ------------------------------------------------------------------

@torch.no_grad()
def precompute_ref_logps(model, tokenizer, path: str, out: str, seq_len: int, batch_size: int = 8,
                         skip_invalid: bool = False, allow_special_tokens: bool | list[str] = False,
                         ) -> tuple[int, int]:
    """Write `out` (jsonl): every usable row of the preference file `path` plus `ref_chosen_logps` /
    `ref_rejected_logps` = the summed answer log-probs under `model` (the reference), encoded exactly as
    training encodes them (chat template, `seq_len` truncation). Returns (rows written, rows skipped)."""
    import json
    import os
    import sys

    from tinylm.data.formats import DataError, check_kind, iter_raw, parse_record
    from tinylm.text.special_tokens import resolve_allow

    allow = resolve_allow(tokenizer, allow_special_tokens)
    rows, pairs, skipped = [], [], 0
    for line, raw, _ in iter_raw(path):
        try:
            rec = parse_record(raw, str(path), line)
            check_kind(rec, "preference", str(path), line)
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        try:
            pair = encode_pair(tokenizer, rec.prompt, rec.chosen, rec.rejected, seq_len, f"{path}:{line}", allow)
        except ValueError:  # the prompt fills seq_len: training skips this row too
            skipped += 1
            continue
        obj = json.loads(raw) if isinstance(raw, str) else dict(raw)
        rows.append({k: v for k, v in obj.items() if k not in REF_COLUMNS})
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs (raise --seq-len?)")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    logps = []
    for i in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[i:i + batch_size], pad_id)
        ids, attn, mask = (b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        lp = sequence_logps(model(ids, attention_mask=attn, use_cache=False).logits, ids, mask).cpu()  # (2n,)
        n = lp.numel() // 2
        logps += list(zip(lp[:n].tolist(), lp[n:].tolist()))
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row, (c, r) in zip(rows, logps):
            f.write(json.dumps({**row, REF_COLUMNS[0]: c, REF_COLUMNS[1]: r}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    if skipped:
        print(f"warning: {path}: skipped {skipped} rows (invalid, or the prompt fills seq_len={seq_len})",
              file=sys.stderr)
    return len(rows), skipped


def main(argv: list[str] | None = None) -> int:
    """`python -m tinylm.posttrain.dpo precompute --model REF --data in.jsonl --out out.jsonl --seq-len N`."""
    import argparse
    import sys

    from tinylm.data.prepare import add_allow_flag
    from tinylm.models.loading import load_model

    ap = argparse.ArgumentParser(prog="python -m tinylm.posttrain.dpo", description="DPO helpers.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precompute", help="add the reference model's log-probs to a preference file",
                       description=precompute_ref_logps.__doc__)
    p.add_argument("--model", required=True, help="reference model: the DPO start model (dir, or a LoRA run's final/)")
    p.add_argument("--data", required=True, help="preference file (any format tinylm reads)")
    p.add_argument("--out", required=True, help="output .jsonl (the rows plus ref_chosen_logps / ref_rejected_logps)")
    p.add_argument("--seq-len", type=int, default=256, help="the training run's seq_len (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows instead of stopping")
    add_allow_flag(p)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = load_model(args.model, dtype="fp32", device=device, tokenizer=args.tokenizer)
        n, skipped = precompute_ref_logps(model, tok, args.data, args.out, args.seq_len, args.batch_size,
                                          args.skip_invalid, args.allow_special_tokens)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the file, no traceback
        print(f"python -m tinylm.posttrain.dpo precompute: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} rows with {REF_COLUMNS[0]} / {REF_COLUMNS[1]}"
          + (f" ({skipped} skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
