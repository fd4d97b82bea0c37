"""Server under load with disconnects: the scenario of tests/test_server_fuzz.py with a real-sized model.

`tinylm serve`'s layout (engine loop in the main thread, HTTP in a thread) with the `small` preset
(random init; speed does not depend on the weights), on 127.0.0.1 only. 32 concurrent streaming
chat clients (greedy, ignore_eos), every third of which hangs up after a few tokens. Measured:
aggregate streamed tokens/s, time to first token (p50/p95 over clients; includes queueing: only
--max-batch sequences decode at once), 5xx responses, engine slots still held once the clients are
gone, the most tokens a cancelled sequence still got after the server cancelled it (engine.cancel_lag),
and one client's tokens/s before and after the load (a leaked slot would slow it down).

    python bench/server_load.py
    python bench/server_load.py --preset tiny --clients 16 --max-tokens 32

Prints `RESULT <name> <value> <unit> ...` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

import torch


def build(preset: str):
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = TinyLMForCausalLM(preset_config(preset, vocab_size=len(tok), eos_token_id=[2, 0])).eval()
    return model, tok


def drive(url: str, engine, args: argparse.Namespace, out: dict) -> None:
    """The clients (in this thread's own event loop): warm-up, one client alone, the load, one client again."""
    from tinylm.serving.server import run_load

    def alone() -> float:  # best of 3: the machine may be shared
        return max(asyncio.run(run_load(url, clients=1, leave_every=0, max_tokens=args.probe_tokens)).tokens_per_s
                   for _ in range(3))

    out["before"] = alone()
    out["load"] = asyncio.run(run_load(url, clients=args.clients, leave_every=args.leave_every,
                                       leave_after=args.leave_after, max_tokens=args.max_tokens, timeout=600))
    deadline = time.time() + 10  # give the engine a moment to drop what the last hang-ups left
    while (engine.num_running() or engine.num_waiting()) and time.time() < deadline:
        time.sleep(0.01)
    out["leaked"] = engine.num_running() + engine.num_waiting() + engine.max_batch - len(engine.gen.free_rows)
    out["lag"] = engine.cancel_lag.copy()
    out["after"] = alone()


def run(args: argparse.Namespace) -> dict:
    import uvicorn

    from tinylm.inference.engine import Engine
    from tinylm.serving.server import create_app, free_port, serve_in_main_thread

    model, tok = build(args.preset)
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.clients, max_seq_len=args.max_tokens + 64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench", max_tokens_cap=args.max_tokens),
                                           host="127.0.0.1", port=port, log_level="warning"))
    out: dict = {}

    def clients() -> None:
        try:
            while not server.started:
                time.sleep(0.02)
            drive(f"http://127.0.0.1:{port}", engine, args, out)
        finally:
            server.should_exit = True

    threading.Thread(target=clients, daemon=True).start()
    serve_in_main_thread(engine, server)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--leave-every", type=int, default=3, help="every k-th client hangs up (0: none)")
    p.add_argument("--leave-after", type=int, default=4, help="content chunks a leaving client reads first")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--probe-tokens", type=int, default=32, help="tokens of the one-client runs before and after")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}, "
          f"{args.clients} clients, max_batch {args.max_batch}, {args.max_tokens} tokens each, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    out = run(args)
    load, lag = out["load"], out["lag"]
    left = sum(c.left for c in load.clients)
    print(f"RESULT server_load_tokens_per_s {load.tokens_per_s:.1f} tok/s clients={args.clients} left={left} "
          f"wall={load.wall_s:.1f}s")
    print(f"RESULT server_load_ttft_p50 {load.ttft(0.5):.3f} s")
    print(f"RESULT server_load_ttft_p95 {load.ttft(0.95):.3f} s")
    print(f"RESULT server_load_5xx {load.server_errors} responses (statuses {sorted({c.status for c in load.clients})})")
    print(f"RESULT server_load_slots_leaked {out['leaked']} slots")
    print(f"RESULT server_load_max_tokens_after_cancel {max(lag, default=0)} tokens "
          f"(cancelled={sum(lag.values())}, by tokens after cancel: {dict(sorted(lag.items()))})")
    print(f"RESULT server_single_client_after_load_tokens_per_s {out['after']:.1f} tok/s "
          f"ratio={out['after'] / out['before']:.2f} vs=before_load ({out['before']:.1f} tok/s)")


if __name__ == "__main__":
    main()
