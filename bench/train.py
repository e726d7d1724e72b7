"""Training benchmarks, measured as ratios within one run (see docs/benchmarks.md).

    .venv/bin/python bench/train.py                 # bundled SmolLM2-135M, CPU
    .venv/bin/python bench/train.py --steps 6 --seq 128

1. Ray Train + DeepSpeed (1 worker, ZeRO-0) step throughput vs a plain torch + peft loop on the
   same model, batch and thread count.                                        goal >= 0.9x
2. Peak memory and trainable-parameter share, LoRA vs full fine-tuning (plain loop, one process
   each, peak RSS).                                                           goal <= 0.5x memory
3. ZeRO 0 / 2 / 3 side by side on 2 Ray Train workers: tokens/s and peak worker RSS.

Each measurement runs in its own process so peak memory is that configuration's alone.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "examples" / "quickstart" / "train.jsonl"


def plain_loop(method: str, steps: int, seq: int, batch: int, threads: int) -> dict:
    """The baseline: the same model, data and optimizer as a lorag worker, with no Ray and no DeepSpeed."""
    import torch

    from lorag.config import LoragConfig
    from lorag.examples import encode_example, load_examples
    from lorag.models import load_tokenizer, resolve_model
    from lorag.worker import _batches, _build_model

    torch.set_num_threads(threads)
    cfg = _config(method, steps, seq, batch, workers=1, stage=0)
    cfg = LoragConfig.model_validate(cfg)
    ad = cfg.adapters[0]
    path = resolve_model(cfg.base_model, cfg.model_cache)
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = _build_model(ad, path)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ad.train.learning_rate)
    data = [encode_example(tok, ex, None, seq) for ex in load_examples(ad.dataset)]
    batches = _batches(data, batch, 0, tok.pad_token_id)
    tokens, t0 = 0, None
    for step in range(steps + 1):
        if step == 1:  # the first step warms caches and allocators; time the rest
            tokens, t0 = 0, time.time()
        b = next(batches)
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return {
        "tokens_per_s": tokens / (time.time() - t0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
    }


def ray_run(steps: int, seq: int, batch: int, workers: int, stage: int) -> dict:
    """lorag's real training path (Ray Train + DeepSpeed) with a peak-RSS sampler on its workers."""
    import psutil
    import ray

    from lorag.config import load_config
    from lorag.train import train_adapter

    peak = {"rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["memory_info"]:
                    total = max(total, p.info["memory_info"].rss)
            peak["rss"] = max(peak["rss"], total)
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "lorag.yaml"
        cfg_path.write_text(yaml.safe_dump(_config("lora", steps + 1, seq, batch, workers, stage)))
        cfg = load_config(cfg_path)
        ray.init(num_cpus=max(2, workers), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        threading.Thread(target=sample, daemon=True).start()
        try:
            m = train_adapter(cfg, "bench").metrics
        finally:
            done.set()
            ray.shutdown()
    # tokens_per_s in the report includes the first (warm-up) step; steps + 1 are run to match the plain loop.
    return {"tokens_per_s": m.tokens_per_s, "peak_worker_rss_mb": peak["rss"] / 2**20, "final_loss": m.final_train_loss}


def _config(method: str, steps: int, seq: int, batch: int, workers: int, stage: int) -> dict:
    return {
        "base_model": "smollm2-135m-instruct",
        "workdir": tempfile.mkdtemp(prefix="lorag-bench-"),
        "adapters": [
            {
                "name": "bench",
                "dataset": str(DATASET),
                "method": method,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                "train": {
                    "max_steps": steps, "batch_size": batch, "max_seq_len": seq, "num_workers": workers,
                    "zero_stage": stage, "learning_rate": 1e-4, "val_fraction": 0.0, "log_every": 1000,
                },
            }
        ],
    }


def _child(kind: str, args: argparse.Namespace, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout)[-800:]}
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement")
    ap.add_argument("--seq", type=int, default=256, help="max tokens per example")
    ap.add_argument("--batch", type=int, default=2, help="examples per worker per step")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "plain":
        print("RESULT " + json.dumps(plain_loop(args.method, args.steps, args.seq, args.batch, threads=1)), flush=True)
        return
    if args.child == "ray":
        print("RESULT " + json.dumps(ray_run(args.steps, args.seq, args.batch, args.workers, args.stage)), flush=True)
        return

    print(f"bench/train.py: SmolLM2-135M, seq {args.seq}, batch {args.batch}, {args.steps} timed steps, CPU ({os.cpu_count()} cores)")
    plain = _child("plain", args, method="lora")
    ray1 = _child("ray", args, workers=1, stage=0)
    full = _child("plain", args, method="full")
    zero = {s: _child("ray", args, workers=2, stage=s) for s in (0, 2, 3)}
    results = {"plain_lora": plain, "ray_ds_1worker_zero0": ray1, "plain_full": full, **{f"ray_ds_2workers_zero{s}": r for s, r in zero.items()}}
    print(json.dumps(results, indent=2))

    print("\n| measurement | value | goal |")
    print("| --- | --- | --- |")
    if "error" not in plain and "error" not in ray1:
        print(f"| Ray Train + DeepSpeed vs plain torch+peft (tokens/s, 1 worker, 1 thread) | {ray1['tokens_per_s'] / plain['tokens_per_s']:.2f}x ({ray1['tokens_per_s']:.0f} vs {plain['tokens_per_s']:.0f}) | >= 0.9x |")
    if "error" not in plain and "error" not in full:
        print(f"| peak memory LoRA / full fine-tune | {plain['peak_rss_mb'] / full['peak_rss_mb']:.2f}x ({plain['peak_rss_mb']:.0f} vs {full['peak_rss_mb']:.0f} MB) | <= 0.5x |")
        print(f"| trainable share LoRA / full | {plain['trainable'] / plain['total']:.2%} vs 100% ({plain['trainable']:,} / {full['trainable']:,}) | - |")
    for s, r in zero.items():
        if "error" in r:
            print(f"| ZeRO-{s}, 2 workers | failed: {r['error'].splitlines()[-1] if r['error'].strip() else 'see log'} | - |")
        else:
            print(f"| ZeRO-{s}, 2 workers | {r['tokens_per_s']:.0f} tok/s, peak worker RSS {r['peak_worker_rss_mb']:.0f} MB | - |")


if __name__ == "__main__":
    main()
