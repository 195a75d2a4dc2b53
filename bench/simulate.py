"""Labelling economics on real defects: accuracy for a budget of human labels (DeepPCB patches).

One real `autolabel run` on the DeepPCB patch folder (its templates/ are images too, as a user would point the tool
at the folder), then `autolabel simulate --no-retrain` for each budget, on the clean rows of labels.csv and on
the long-tailed subset. Prints one table and writes bench/results/simulate.json.

    .venv/bin/python bench/simulate.py [--workspace /tmp/pcb] [--budgets 0.005 0.01 0.02 0.05] [--skip-run]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "deeppcb-patches"
AUTOLABEL = [sys.executable, "-m", "flows.cli"]


def clean_labels(src: Path, dest: Path) -> int:
    """path,label rows without other-class defects in the crop (DeepPCB's clean single-label rows)."""
    with open(src, newline="") as fh, open(dest, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label"])
        n = 0
        for row in csv.DictReader(fh):
            if not row.get("other_class_in_crop"):
                writer.writerow([row["path"], row["label"]])
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/pcb"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip-run", action="store_true", help="reuse the workspace's last run")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    sets = {"deeppcb-clean": tmp / "clean.csv", "deeppcb-longtail": tmp / "longtail.csv"}
    sizes = {name: clean_labels(DATA / src, sets[name]) for name, src in
             (("deeppcb-clean", "labels.csv"), ("deeppcb-longtail", "labels-longtail.csv"))}
    results: dict[str, object] = {"sizes": sizes, "runs": []}
    if not args.skip_run:
        start = time.perf_counter()
        subprocess.run([*AUTOLABEL, "run", "--images", str(DATA), "--labels", str(sets["deeppcb-clean"]),
                        "--workspace", str(args.workspace)], check=True, cwd=ROOT)
        results["retrain_seconds"] = round(time.perf_counter() - start, 1)
    results["evaluate"] = json.loads((args.workspace / "results/evaluate/metrics.json").read_text())
    for name, labels in sets.items():
        for budget in args.budgets:
            start = time.perf_counter()
            subprocess.run([*AUTOLABEL, "simulate", "--images", str(DATA), "--labels", str(labels), "--budget",
                            str(budget), "--rounds", str(args.rounds), "--workspace", str(args.workspace),
                            "--no-retrain"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            m = json.loads((args.workspace / "results/simulate/metrics.json").read_text())
            m.update(set=name, seconds=round(time.perf_counter() - start, 1))
            results["runs"].append(m)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(results, indent=2, default=str))
    header = ("set", "budget", "labels", "hand-label all", "overall acc", "auto-acc", "coverage", "macro recall")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for m in results["runs"]:
        print(f"| {m['set']} | {m['budget']:.1%} | {m['labels_used']} | {m['n_images']} | "
              f"{m['overall_accuracy']:.3f} | {m['auto_accepted_accuracy'] or float('nan'):.3f} | "
              f"{m['coverage']:.3f} | {m['macro_recall']:.3f} |")


if __name__ == "__main__":
    main()
