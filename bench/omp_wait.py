"""OpenMP wait policy under load: SimCLR training time with spinning vs sleeping threads (issue 8).

Runs ``tasks.embedding.train_simclr`` (params.yaml's embed section, 1 epoch on random 64 px images, two torch
threads) in fresh processes with ``OMP_WAIT_POLICY`` ACTIVE and PASSIVE alternately, and with one thread as a
reference, beside another job: a two-thread torch loop with the default wait policy (another run, a test suite) at
the same priority and at ``nice -n 19``, a one-thread Python loop at ``nice -n 19``, then nothing.
``tasks/__init__.py`` sets PASSIVE because of this measurement.

    .venv/bin/python bench/omp_wait.py [--n 2000] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
from tasks.config import load_params
from tasks.embedding import train_simclr
torch.set_num_threads({threads})
imgs = np.random.default_rng(0).integers(0, 255, ({n}, 64, 64), dtype=np.uint8)
params = load_params({params!r}).embed.model_copy(update={{"epochs": 1}})
t = time.perf_counter(); train_simclr(imgs, params, 0); print(time.perf_counter() - t)
"""


TORCH_JOB = """
import torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
while True:
    for _ in range(50):
        a = torch.tanh(a @ a.T / 256)
"""
"""Another user's torch job with the library's default wait policy (spinning threads)."""


def timed(policy: str, threads: int, n: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    code = CHILD.format(root=str(ROOT), threads=threads, n=n, params=str(ROOT / "params.yaml"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    cases = {
        "ACTIVE, 2 threads": ("ACTIVE", 2),
        "PASSIVE, 2 threads": ("PASSIVE", 2),
        "1 thread": ("PASSIVE", 1),
    }
    competitors = {  # (nice level, code)
        "a torch job beside (2 threads, nice 0)": (0, TORCH_JOB),
        "a torch job beside (2 threads, nice 19)": (19, TORCH_JOB),
        "a Python loop beside (nice 19)": (19, "while True: pass"),
        "nothing else started": (0, None),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for load, (nice, job) in competitors.items():
        busy = None
        if job is not None:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            busy = subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", job], env=env)
            time.sleep(2)
        try:
            results[load] = {name: [] for name in cases}
            for _ in range(args.reps):
                for name, (policy, threads) in cases.items():
                    results[load][name].append(timed(policy, threads, args.n))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        for name, secs in results[load].items():
            print(f"{load:>40} | {name:<18} | {min(secs):6.2f} s (runs: {secs})")
    print(json.dumps({"n": args.n, "seconds": results, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
