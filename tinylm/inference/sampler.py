"""Rollout sampling for RL stages (GRPO, PPO, agentic RL): prompt rows, batched sampling with the
static KV cache, eos ids.

Kept below grpo.py so that the agent loop (agent.py) and agentic RL (agent_rl.py) sample without
importing the GRPO trainer; grpo.py re-exports these names.
"""

from __future__ import annotations

import torch


def load_prompts(path: str) -> list[dict]:
    """Prompt rows {"prompt": str | [messages], ...extra columns for the rewards}; errors name file:line."""
    import json

    rows = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such prompt file") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            p = row.get("prompt") if isinstance(row, dict) else None
            ok = (isinstance(p, str) and p.strip()) or (
                isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))
            if not ok:
                raise ValueError(f"{path}:{n}: field 'prompt': must be a non-empty string or a list of "
                                 "{role, content} messages")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompt rows")
    return rows


def prompt_messages(row: dict) -> list[dict]:
    p = row["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def prompt_text(row: dict) -> str:
    p = row["prompt"]
    return p if isinstance(p, str) else p[-1]["content"]


def eos_ids_of(model, tokenizer) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_ids: tuple[int, ...] = (2, 0),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt (repeat a prompt G times for a group).

    tinylm models decode with the preallocated StaticKVCache (rows of different prompt lengths,
    no padding of the prompt); other Hugging Face models use their own `generate`. temperature 0
    is greedy. Each completion ends with its eos token (kept) or stops at max_new_tokens.

    Sharded weights (FSDP2, DeepSpeed ZeRO-3) make every forward a collective, so a rank whose rows
    all ended keeps stepping (its outputs ignored) until every rank's rows ended: the `synced_gpus`
    of Hugging Face `generate`. Each step then costs one extra all-reduce of a flag.
    """
    from tinylm.models.kv_cache import StaticKVCache
    from tinylm.training.parallel import forward_is_collective

    device = next(model.parameters()).device
    synced = forward_is_collective(model)
    was_training = model.training
    model.eval()
    try:
        if getattr(model.config, "model_type", "") != "tinylm":
            return _hf_sample(model, prompts, max_new_tokens, temperature, eos_ids, synced)
        b = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=device)
        t_max = int(lens.max())
        ids = torch.zeros(b, t_max, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, device=device)
        attn = (torch.arange(t_max, device=device)[None] < lens[:, None]).long()  # right padding
        dtype = next(model.parameters()).dtype
        cache = StaticKVCache(model.config, b, t_max + max_new_tokens, device=device, dtype=dtype)
        logits = model(ids, attention_mask=attn, cache=cache, use_cache=True).logits
        last = logits[torch.arange(b, device=device), lens - 1]            # (B, V)
        eos = torch.tensor(eos_ids, device=device)
        out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
        alive = torch.ones(b, dtype=torch.bool, device=device)
        n = 0
        for n in range(max_new_tokens):
            if not alive.any():  # synced and done here while other ranks sample: feed pads, draw nothing
                tok = torch.zeros(b, dtype=torch.long, device=device)
            elif temperature <= 0:
                tok = last.argmax(-1)
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            out[:, n] = torch.where(alive, tok, 0)
            alive_before = alive
            alive = alive & ~torch.isin(tok, eos)
            if not _any_alive(alive, synced):
                break
            logits = model(tok[:, None], attention_mask=alive_before[:, None].long(), cache=cache,
                           use_cache=True).logits
            last = logits[:, -1]
        res = []
        for i in range(b):
            row = out[i, : n + 1].tolist()
            for j, t in enumerate(row):
                if t in eos_ids:
                    row = row[: j + 1]
                    break
            res.append(row)
        return res
    finally:
        model.train(was_training)


def _any_alive(alive: torch.Tensor, synced: bool) -> bool:
    """alive (B,) bool -> whether any row still samples, on this rank or (synced) on any rank."""
    flag = alive.any()
    if synced:  # one all-reduce per step, in the same order on every rank
        import torch.distributed as dist

        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _hf_sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
               eos_ids: tuple[int, ...], synced: bool = False) -> list[list[int]]:
    """Left-padded `model.generate` for non-tinylm causal LMs (synced_gpus under sharded weights)."""
    device = next(model.parameters()).device
    t_max = max(len(p) for p in prompts)
    pad = eos_ids[-1]
    ids = torch.tensor([[pad] * (t_max - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (t_max - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                         eos_token_id=list(eos_ids), pad_token_id=pad, synced_gpus=synced, **kw)[:, t_max:]
    res = []
    for row in gen.tolist():
        for j, t in enumerate(row):
            if t in eos_ids:
                row = row[: j + 1]
                break
        res.append(row)
    return res
