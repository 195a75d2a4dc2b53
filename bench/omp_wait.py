"""OpenMP wait policy under load: SimCLR training time with spinning vs sleeping threads (issue 8).

Runs ``tasks.embedding.train_simclr`` (params.yaml's embed section, 1 epoch on random 64 px images, two torch
threads) in fresh processes with ``OMP_WAIT_POLICY`` ACTIVE and PASSIVE alternately, and with one thread as a
reference, while a competing one-thread busy loop (``nice -n 19``, like another user's job) runs beside them, then
once more without it. ``tasks/__init__.py`` sets PASSIVE because of this measurement.

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
    cases = {"ACTIVE, 2 threads": ("ACTIVE", 2), "PASSIVE, 2 threads": ("PASSIVE", 2), "1 thread": ("PASSIVE", 1)}
    results: dict[str, dict[str, list[float]]] = {}
    for load in ("one busy process beside", "nothing else started"):
        busy = None
        if load.startswith("one"):
            busy = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
            time.sleep(1)
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
            print(f"{load:>24} | {name:<18} | {min(secs):6.2f} s (runs: {secs})")
    print(json.dumps({"n": args.n, "seconds": results, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
