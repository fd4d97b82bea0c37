"""How fast can one fp32 training step of `small` be on this CPU at all? (the 1.3x-vs-Llama question)

A step's unavoidable work is its matrix products: for every linear layer the forward X @ W^T and the
two backward products dX = dY @ W and dW = dY^T @ X, plus causal attention forward/backward. This
script times exactly those kernels alone (same shapes, same threads, nothing else in between), which
is a floor no implementation of the same model in the same precision can beat, then times a full
training step of tinylm and of transformers' LlamaForCausalLM in the same process, and prints how
close each is to the floor and the largest ratio over Llama that is physically available.

    python bench/roofline.py                 # small, seq 340 x batch 8, fp32
    python bench/roofline.py --dtype bf16    # the same with bf16 autocast kernels
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPE = dict(vocab_size=6400, hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def kernel_floor(n_tokens: int, batch: int, seq: int, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds for the matmuls + attention of one fwd/bwd step, and their FLOPs."""
    h, f, v, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    heads, kv, d = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], h // SHAPE["num_attention_heads"]
    per_layer = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, f), (h, f), (f, h)]  # (in, out)
    shapes = per_layer * layers + [(h, v)]  # + lm_head
    xs = {k: torch.randn(n_tokens, k, dtype=dtype) for k in {i for i, _ in shapes} | {o for _, o in shapes}}
    ws = [torch.randn(o, i, dtype=dtype) for i, o in shapes]
    q = torch.randn(batch, heads, seq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads, seq, d, dtype=dtype, requires_grad=True)
    val = torch.randn(batch, heads, seq, d, dtype=dtype, requires_grad=True)

    def gemms() -> None:
        for (i, o), w in zip(shapes, ws):
            F.linear(xs[i], w)  # forward
            xs[o] @ w  # dX
            xs[o].t() @ xs[i]  # dW

    def attention() -> None:
        for _ in range(layers):
            F.scaled_dot_product_attention(q, k, val, is_causal=True).sum().backward()

    flops = sum(6 * n_tokens * i * o for i, o in shapes) + layers * 3.5 * 2 * 2 * batch * heads * seq * seq * d / 2
    return best_of(gemms, 3) + best_of(attention, 3), flops


def step_time(which: str, batch: int, seq: int, dtype: str) -> float:
    from tinylm.training.loop_parts import autocast_settings, keep_freed_memory_in_heap
    from tinylm.training.objectives import LMObjective
    from tinylm.training.trainconfig import TrainConfig

    keep_freed_memory_in_heap()
    torch.manual_seed(0)
    if which == "tinylm":
        from tinylm.models.config import TinyLMConfig
        from tinylm.models.model import TinyLMForCausalLM
        model = TinyLMForCausalLM(TinyLMConfig(**SHAPE)).train()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).train()
    cfg = TrainConfig(seq_len=seq, batch_size=batch, dtype=dtype)
    ac, _ = autocast_settings(cfg, torch.device("cpu"))
    obj = LMObjective(cfg)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    batch_t = {"input_ids": ids, "labels": ids.clone()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def one() -> None:
        with torch.autocast("cpu", dtype=ac, enabled=ac is not None):
            loss_sum, n, _ = obj.loss(model, batch_t)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    return best_of(one, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=340)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    n = args.batch * args.seq
    floor_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    floor, flops = kernel_floor(n, args.batch, args.seq, floor_dtype)
    ours, llama = step_time("tinylm", args.batch, args.seq, args.dtype), step_time("llama", args.batch, args.seq, args.dtype)
    print(f"small, {args.batch} x {args.seq}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"kernel floor (matmuls + attention only): {floor:.3f} s/step = {flops / floor / 1e9:.0f} GFLOP/s, "
          f"max {n / floor:.0f} tok/s")
    print(f"tinylm step {ours:.3f} s ({n / ours:.0f} tok/s, {floor / ours:.0%} of the floor); "
          f"Llama step {llama:.3f} s ({n / llama:.0f} tok/s, {floor / llama:.0%})")
    print(f"best possible ratio over Llama with these kernels: {llama / floor:.2f}x (tinylm now {llama / ours:.2f}x)")
    print(f"RESULT roofline_max_tokens_per_s {n / floor:.0f} tok/s ratio={llama / floor:.2f} vs=hf_llama")
    print(f"RESULT roofline_tinylm_efficiency {floor / ours:.2f} fraction ratio={llama / ours:.2f} vs=hf_llama")


if __name__ == "__main__":
    main()
