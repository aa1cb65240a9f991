"""Shared PyTorch side of the training benchmarks (benches/train_ref.py,
benches/train_unet_ref.py): command-line arguments, and the timed
AdamW training loop that prints the one JSON line `benches/common`
parses (median forward / backward / optimizer / step ms after 2 warm-up
steps, peak RSS in MB including the imports, final loss, extra fields)."""

import argparse
import json
import resource
import statistics
import time

import torch

WARMUP = 2


def setup():
    """Parse `--steps` / `--threads`, set the thread count and seed 0."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def time_training(parameters, loss_fn, steps, **extra):
    """Run `WARMUP + steps` AdamW(lr 1e-4) steps of `loss_fn()` over `parameters`
    and print the JSON line (`extra` fields appended)."""
    opt = torch.optim.AdamW(parameters, lr=1e-4)
    fw, bw, op, st = [], [], [], []
    for i in range(WARMUP + steps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= WARMUP:
            fw.append((t1 - t0) * 1e3)
            bw.append((t2 - t1) * 1e3)
            op.append((t3 - t2) * 1e3)
            st.append((t3 - t0) * 1e3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "forward_ms": statistics.median(fw),
        "backward_ms": statistics.median(bw),
        "optimizer_ms": statistics.median(op),
        "step_ms": statistics.median(st),
        "peak_rss_mb": rss,
        **extra,
        "loss": loss.item(),
    }))
