"""Does DeepSpeed ZeRO run on this CPU machine? Stages 1, 2, 3 on 2 gloo processes (docs/distributed.md).

DeepSpeed is not a tinylm dependency (install it yourself: `pip install -c constraints.txt deepspeed`,
or into a separate directory and put it on PYTHONPATH). Each stage trains the same tiny tinylm model
for a few steps with `deepspeed.initialize` and a torch AdamW, then saves a DeepSpeed checkpoint:

    python bench/deepspeed_zero_cpu.py

Prints the per-step losses of each stage and one `RESULT deepspeed_zero<k>_final_loss <loss> loss
ratio=<x> vs=zero1` line per stage (the stages compute the same update, so the ratios are 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3


def worker(stage: int, out: str) -> None:
    import deepspeed
    import torch

    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = TinyLMForCausalLM(TinyLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           config=config)
    g = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    for step in range(STEPS):
        ids = torch.randint(0, 512, (2, 16), generator=g)  # (B, T): each rank its own rows
        loss = engine(ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        if torch.distributed.get_rank() == 0:
            print(f"LOSS {stage} {step} {float(loss):.6f}", flush=True)
    engine.save_checkpoint(out)


def main() -> None:
    try:
        import deepspeed
    except ImportError:
        raise SystemExit("deepspeed is not installed: pip install -c constraints.txt deepspeed") from None
    print(f"deepspeed {deepspeed.__version__}, load average {os.getloadavg()}")
    finals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (1, 2, 3):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--worker", str(stage), str(Path(tmp) / f"zero{stage}")]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"ZeRO-{stage} failed:\n{proc.stderr[-3000:]}")
                continue
            losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("LOSS")]
            print(f"ZeRO-{stage}: losses {losses}, checkpoint saved")
            finals[stage] = losses[-1]
    for stage, loss in finals.items():
        ratio = f" ratio={loss / finals[1]:.6f} vs=zero1" if 1 in finals else ""
        print(f"RESULT deepspeed_zero{stage}_final_loss {loss:.6f} loss{ratio}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
