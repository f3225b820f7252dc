"""Training speed: seconds per optimisation step of the cpu-quick `spineseg` row, fp32 against bf16 autocast.

    python benchmarks/bench_train.py --json benchmarks/train.json [--repeats 5]

One step is what `spineseg train` does per batch of the adversarial row: a no-gradient generator pass for
the critic's fake maps, one WGAN-GP critic update, then the generator's forward and backward (CE + soft
Dice + the adversarial term) and an Adam step, on a batch of 8 random 192 x 192 slices (the demo's
setting). `train.cpu_bf16` runs bf16 where the processor has native bfloat16 (``spineseg.precision``); the
bf16 row is left out elsewhere, where emulated bfloat16 is many times slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch

    from spineseg import NUM_CLASSES
    from spineseg.models.checkpoint import model_from_config
    from spineseg.models.critic import Critic
    from spineseg.precision import dtype_name, native_bf16, training_autocast_dtype
    from spineseg.train.config import resolve_config
    from spineseg.train.losses import seg_loss_from_config
    from spineseg.train.steps import GeneratorStep, adversary_from_config, critic_optimizer, generator_optimizer

    cfg = resolve_config("spineseg", "cpu-quick")
    tc, size, cpu = cfg["train"], cfg["preprocess"]["target_size"], torch.device("cpu")
    image = torch.randn(tc["batch_size"], 1, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, NUM_CLASSES, (tc["batch_size"], size, size), generator=torch.Generator().manual_seed(1))
    rows = []
    for dtype in (None, training_autocast_dtype(cpu, cpu_bf16=True)) if native_bf16(cpu) else (None,):
        torch.manual_seed(0)
        model, critic = model_from_config(cfg), Critic(1 + NUM_CLASSES, **cfg["critic"])
        adversary = adversary_from_config(critic, critic_optimizer(critic, tc), tc)
        step = GeneratorStep(model, generator_optimizer(model, tc), seg_loss_from_config(tc),
                             torch.amp.GradScaler("cuda", enabled=False), cpu, dtype, adversary)
        step(image, labels, True)  # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            step(image, labels, True)
            times.append(time.perf_counter() - t)
        rows.append({"precision": dtype_name(dtype), "batch": tc["batch_size"], "input": size,
                     "seconds_per_step": round(statistics.median(times), 3), "seconds_min": round(min(times), 3),
                     "repeats": a.repeats})
        print(f"{rows[-1]['precision']}: {rows[-1]['seconds_per_step']:.3f} s per step (median of {a.repeats})", flush=True)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "native_bf16": native_bf16(cpu)},
           "what": "one adversarial training step of spineseg / cpu-quick (critic update + generator update)",
           "command": f"python benchmarks/bench_train.py --json {a.json} --repeats {a.repeats}", "rows": rows}
    if len(rows) == 2:
        out["fp32_over_bf16"] = round(rows[0]["seconds_per_step"] / rows[1]["seconds_per_step"], 2)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
