"""Performance against the machine's limits: throughput, orchestration overhead, memory, clustering scale, refresh.

Every ratio is measured side by side in one run of this script, on synthetic data (``autolabel synth``):

1. ``embed_vs_bare``: images/s of the embed stage (``tasks.stages.run_embed`` on a workspace) vs a bare loop over the
   same pre-decoded images with the same model, batch and threads: for the default combo, the descriptor functions
   (``tasks.descriptors.*_features``) in chunks of ``runner.chunk`` and, for its SimCLR block, the same
   ``tasks.embedding.train_simclr`` loop followed by ``model(x)`` over batches of 256; for ``embed.method=cnn``,
   ``model(x)`` under ``torch.no_grad`` over pre-made uint8 tensors of 256 images.
2. ``stats_vs_decode``: images/s of ``tasks.quality.compute_stats`` as the stage calls it (``DEFAULT_WORKERS``
   threads) vs a bare single-threaded Pillow loop ``Image.open(p).load()`` (and vs ``tasks.datasets.decode``, the
   project's decoder) over the same files, page cache warm for both; one thread and two threads are also measured.
3. ``orchestration_overhead``: wall time of ``autolabel run`` (Prefect flow, MLflow, DVC, git, process start) vs the
   same compute stages called as plain functions (run_validate ... run_publish) in a fresh process;
   ``(flow - plain) / flow``.
4. ``rss_big_vs_small``: peak RSS of ``autolabel run`` on the large vs the small synthetic set. Two readings: the
   largest single process of the run (its ``VmHWM`` high-water mark, sampled every 0.5 s; ``wait4``'s ``ru_maxrss``
   is recorded too, but Linux carries it across fork and exec, so it is never below this bench's own RSS) and the
   sum over the process tree sampled every 0.5 s (Prefect's server and DVC run as child processes).
5. ``cluster``: ``tasks.clustering.cluster`` with ``params.yaml``'s cluster section (+ ``internal_metrics``, as the
   stage calls it) on clustered random vectors of dimension 128, one fresh process per size: seconds and peak RSS;
   ``--exact-n`` also runs the path without the size switch (``LARGE_N``) for comparison.
6. ``refresh_big_vs_small``: wall time of ``autolabel refresh --no-retrain`` of the same 1k new images on the
   workspaces of (4), large vs small.
7. ``startup`` (``--parts startup``, not in the default set): seconds from process start to the flow's first task
   of ``autolabel run`` on 50 images in a fresh workspace, alternating with another checkout's code
   (``--startup-baseline``, e.g. a git worktree of an older commit).

Heavy children run under ``nice -n 10`` (shared cores). The flow's wall time is also split into phases from its
log (``flow_phases``); the machinery-only phases give a lower bound of the overhead that needs no second run at the
same load (``machinery_share_from_flow_log``). Measurements are kept in ``bench/results/perf.json`` under
``measurements`` (with the command line and the load average before/after); ``--reuse`` keeps earlier ones (and
their workspaces) instead of measuring again, so the quick sizes and the full sizes can be run one after the other.
Data sets, workspaces and logs go to ``--data-dir`` (``/tmp/perf``); ``--mode NAME`` keeps a repeat apart.

    .venv/bin/python bench/perf.py --quick            # 2k flow/plain, RSS + refresh 2k vs 10k, clustering 100k + 1M
    .venv/bin/python bench/perf.py                    # 10k flow/plain, RSS + refresh 10k vs 50k, clustering 100k + 1M
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "perf.json"
PARAMS = ROOT / "params.yaml"
NICE = ["nice", "-n", "10"]
AUTOLABEL = [sys.executable, "-m", "flows.cli"]
TARGETS = {
    "embed_vs_bare": (">=", 0.9),
    "stats_vs_decode": (">=", 0.8),
    "orchestration_overhead": ("<=", 0.10),
    "rss_big_vs_small": ("<=", 1.3),
    "refresh_big_vs_small": ("<=", 1.3),
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def load_average() -> str:
    return uptime().split("load average:")[-1].strip()


# ------------------------------------------------------------------------------------------------ child processes


def measure(cmd: list[str], log_path: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS of its largest process (wait4) and of its whole tree (sampled)."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = load_average()
    now = datetime.now()
    start_clock = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    start = time.perf_counter()
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    peak_tree, peak_one, timed_out = 0, 0, False
    try:
        parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        parent = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if parent is not None:
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in procs if p.is_running()))
                peak_one = max(peak_one, *(high_water_mb(p.pid) for p in procs))
            except psutil.Error:
                pass
        if timeout is not None and time.perf_counter() - start > timeout and not timed_out:
            timed_out = True
            for p in [*(parent.children(recursive=True) if parent else []), parent]:
                try:
                    p.kill()
                except (psutil.Error, AttributeError):
                    pass
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "command": shlex.join(str(c) for c in cmd),
        "seconds": round(seconds, 1),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        # the largest process of the tree: its own high-water mark (VmHWM), sampled. wait4's ru_maxrss is kept for
        # reference but is floored by this bench's own RSS: Linux carries it across fork and exec
        "peak_rss_mb": peak_one or round(usage.ru_maxrss / 1024),
        "wait4_maxrss_mb": round(usage.ru_maxrss / 1024),  # Linux: KB
        # CPU seconds of the process and every descendant it reaped (DVC, the Prefect server): a side that is slower
        # with the same CPU waited (scheduling, I/O); one with more CPU did more work
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_tree_rss_mb": round(peak_tree / 2**20),
        "load_before": before,
        "load_after": load_average(),
        "log": str(log_path),
        "start_clock": round(start_clock, 2),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if proc.returncode != 0 and not timed_out:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{result['command']} failed ({proc.returncode}):\n{tail}")
    return result


def high_water_mb(pid: int) -> int:
    """A process's peak RSS so far (``VmHWM``, MB; 0 when unreadable). Unlike ``ru_maxrss`` it belongs to the
    process's own memory map, which exec replaces, so a child does not inherit its parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return 0


def prefect_template() -> Path | None:
    """The migrated Prefect database new workspaces start from (``flows.cli._prefect_template``), if this code has
    one: whether it existed before a flow run changes that run's start-up by 10-20 s, so it is recorded."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        prefect_version = version("prefect")
    except PackageNotFoundError:
        return None
    from tasks.dbtemplates import cache_dir

    return cache_dir() / f"prefect-{prefect_version}.db"


def flow_phases(log_path: Path, start_clock: float, seconds: float) -> dict[str, float]:
    """Where a flow run's wall time went, from its log's timestamps (local time of day, like ``start_clock``): process
    start to the temporary Prefect server, the server's start-up, each task (time since the previous task finished,
    so engine and MLflow calls between tasks count with the next task) and what follows the flow's end."""
    import re

    stamps: list[tuple[str, float]] = [("process_start", start_clock)]
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)", line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        text = m[4]
        if "Starting temporary server" in text:
            stamps.append(("before_server", t))
        elif "Beginning flow run" in text:
            stamps.append(("server_startup", t))
        elif (task := re.search(r"Task run '(.+)-[0-9a-f]{3}' - Finished", text)) is not None:
            stamps.append((task[1], t))
        elif re.search(r"Flow run '.*' - Finished", text):
            stamps.append(("flow_end", t))
    stamps.append(("after_flow_end", start_clock + seconds))
    out: dict[str, float] = {}
    for (_, prev), (name, t) in zip(stamps, stamps[1:], strict=False):
        out[name] = round(out.get(name, 0.0) + t - prev, 1)
    return out


def child_json(log_path: Path) -> dict[str, Any]:
    """The JSON a ``_plain``/``_cluster`` child prints as its last line."""
    lines = [x for x in log_path.read_text().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])


def plain_child(workspace: str) -> None:
    """The retrain flow's compute stages as plain functions on a workspace whose data/images is filled."""
    start = time.perf_counter()
    from tasks import stages
    from tasks.config import load_params
    from tasks.workspace import Workspace

    ws = Workspace.at(workspace)
    params = load_params(PARAMS)
    times = {"imports": round(time.perf_counter() - start, 2)}
    context = {
        "data": {"md5": "plain-functions", "nfiles": None, "remote": None},
        "code": {"git_commit": None},
        "models": {},
        "mlflow_run_id": None,
        "mlflow_experiment": None,
        "mlflow_tracking_uri": None,
    }
    steps = [
        ("validate", lambda: stages.run_validate(ws, params)),
        ("standardize", lambda: stages.run_standardize(ws, params)),
        ("embed", lambda: stages.run_embed(ws, params)),
        ("cluster", lambda: stages.run_cluster(ws, params)),
        ("evaluate", lambda: stages.run_evaluate(ws, params)),
        ("annotate", lambda: stages.run_annotate(ws, params)),
        ("publish", lambda: stages.run_publish(ws, params, context)),
    ]
    for name, fn in steps:
        t = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t, 2)
    times["total"] = round(time.perf_counter() - start, 2)
    print(json.dumps(times))


def cluster_child(n: int, exact: bool, seed: int = 0) -> None:
    """Clustered random vectors (n, 128) through tasks.clustering.cluster with params.yaml's cluster section."""
    import numpy as np
    import psutil

    from tasks import clustering
    from tasks.config import load_params
    from tasks.stages import _set_threads

    params = load_params(PARAMS)
    _set_threads(params)
    if exact:
        clustering.LARGE_N = 1 << 62
    knn_seconds: list[float] = []
    knn = clustering.knn_indices

    def timed_knn(*args, **kwargs):
        t = time.perf_counter()
        out = knn(*args, **kwargs)
        knn_seconds.append(time.perf_counter() - t)
        return out

    clustering.knn_indices = timed_knn
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, 128)).astype(np.float32)
    weights = rng.dirichlet(np.ones(32) * 0.5)  # unequal cluster sizes
    vectors = np.empty((n, 128), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        member = rng.choice(32, size=b - a, p=weights)
        vectors[a:b] = centres[member] + rng.normal(scale=0.7, size=(b - a, 128)).astype(np.float32)
    base = psutil.Process().memory_info().rss
    t = time.perf_counter()
    result = clustering.cluster(vectors, params.cluster, params.base.seed)
    cluster_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics = clustering.internal_metrics(vectors, result.labels, params.base.seed)
    metrics_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "n": n,
                "exact": exact,
                "method": params.cluster.method,
                "k": params.cluster.k,
                "fit_sample": result.model.info.get("fit_sample"),
                "cluster_seconds": round(cluster_s, 1),
                "knn_seconds": round(sum(knn_seconds), 1),
                "internal_metrics_seconds": round(metrics_s, 1),
                "rss_after_vectors_mb": round(base / 2**20),
                "silhouette": metrics["silhouette"],
                "clusters_used": int((np.bincount(result.labels) > 0).sum()),
            }
        )
    )


# ------------------------------------------------------------------------------------------------ data, workspaces


def dataset(data_dir: Path, name: str, n: int, seed: int) -> Path:
    out = data_dir / name
    if not (out / "labels.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([*NICE, *AUTOLABEL, "synth", str(out), "--n", str(n), "--seed", str(seed)], check=True, cwd=ROOT)
    return out


def images_set(data_dir: Path, n: int) -> Path:
    return dataset(data_dir, f"s{n // 1000}k" if n % 1000 == 0 else f"s{n}", n, 0)


def set_aside(path: Path) -> None:
    """Move an old workspace out of the way (a rename) instead of deleting it before a timed run.

    This VM mounts its disk with ``discard``: for a minute after a 30k-file tree is deleted, creating files costs
    ~0.5 ms each instead of 20 us (2,000 ``touch``: 1.2 s right after deleting 20k files, 0.04 s 45 s later), which
    made the version step of the next run 4.4-21 s. The trash is emptied by ``--empty-trash`` or by hand.
    """
    if path.exists():
        trash = path.parent / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        path.rename(trash / f"{path.name}-{time.time_ns()}")


def fill_workspace(ws: Path, images: Path) -> None:
    """A fresh workspace whose data/images holds the images (hard links; untimed)."""
    set_aside(ws)
    (ws / "data").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(images), str(ws / "data" / "images")], check=True)


# ------------------------------------------------------------------------------------------------ the parts


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.data = args.data_dir
        self.mode = args.mode
        self.ws = args.data_dir / f"ws-{self.mode}"
        self.logs = args.data_dir / f"logs-{self.mode}"
        self.state: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        self.state.setdefault("measurements", {})
        self.fresh: set[str] = set()  # measured by this run

    def save(self) -> None:
        """Write this run's measurements and ratios into perf.json, keeping what other runs wrote meanwhile."""
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        disk = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        disk.setdefault("measurements", {}).update({k: self.state["measurements"][k] for k in self.fresh})
        if self.args.mode in self.state.get("ratios", {}):
            disk.setdefault("ratios", {})[self.args.mode] = self.state["ratios"][self.args.mode]
        self.state = disk
        RESULTS.write_text(json.dumps(disk, indent=2, default=str) + "\n")

    def have(self, key: str, workspace: Path | None = None) -> dict[str, Any] | None:
        key = f"{self.mode}/{key}"
        m = self.state["measurements"].get(key)
        if m is not None and (self.args.reuse or key in self.fresh) and (workspace is None or workspace.is_dir()):
            print(f"reusing {key} ({m.get('at')})")
            return m
        return None

    def record(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        key = f"{self.mode}/{key}"
        self.state["measurements"][key] = value
        self.fresh.add(key)
        self.save()
        print(f"{key}: {json.dumps({k: v for k, v in value.items() if k not in ('log',)})}")
        return value

    def flow(self, n: int, pair: int = 0) -> dict[str, Any]:
        key, ws = pair_key("flow", n, pair), self.ws / pair_key("flow", n, pair, path=True)
        if (m := self.have(key, ws)) is not None:
            return m
        images = images_set(self.data, n)
        set_aside(ws)
        cmd = [*NICE, *AUTOLABEL, "run", "--images", str(images), "--workspace", str(ws)]
        template = prefect_template()
        had_template = template is not None and template.is_file()
        m = measure(cmd, self.logs / f"{ws.name}.log")
        phases = flow_phases(Path(m["log"]), m["start_clock"], m["seconds"])
        machinery = round(sum(v for k, v in phases.items() if k not in COMPUTE_PHASES), 1)
        return self.record(
            key,
            {
                "n": n,
                "workspace": str(ws),
                **m,
                "prefect_template_before": had_template,  # False: this run also made the machine's template
                "phases": phases,
                "machinery_s": machinery,
            },
        )

    def plain(self, n: int, pair: int = 0) -> dict[str, Any]:
        key, ws = pair_key("plain", n, pair), self.ws / pair_key("plain", n, pair, path=True)
        if (m := self.have(key, ws)) is not None:
            return m
        fill_workspace(ws, images_set(self.data, n))
        cmd = [*NICE, sys.executable, str(Path(__file__).resolve()), "_plain", str(ws)]
        m = measure(cmd, self.logs / f"{ws.name}.log")
        return self.record(key, {"n": n, "workspace": str(ws), **m, "stages": child_json(Path(m["log"]))})

    def refresh(self, n: int) -> dict[str, Any]:
        ws = self.ws / pair_key("flow", n, 0, path=True)  # the workspace flow(n) made
        if (m := self.have(f"refresh:{n}", ws)) is not None:
            return m
        self.flow(n)
        batch = dataset(self.data, f"batch{self.args.batch // 1000}k", self.args.batch, 101)
        cmd = [*NICE, *AUTOLABEL, "refresh", "--images", str(batch), "--workspace", str(ws), "--no-retrain"]
        m = measure(cmd, self.logs / f"refresh-{n}.log")
        return self.record(f"refresh:{n}", {"n": n, "batch": self.args.batch, **m})

    def startup(self, reps: int, baseline: Path | None) -> dict[str, Any]:
        """Start-up of ``autolabel run`` on 50 images in a fresh workspace: seconds from process start to the
        Prefect server's log line and to the flow's first task, and wall; alternating with the same command run
        from ``baseline`` (a checkout of other code, e.g. a git worktree) when given."""
        import re

        images = dataset(self.data, "s50", 50, 0)
        sides = {"this": ROOT, **({"baseline": baseline.resolve()} if baseline else {})}
        runs = []
        for rep in range(reps):
            for side, root in sides.items():
                ws = self.ws / f"startup-{side}-{rep}"
                shutil.rmtree(ws, ignore_errors=True)
                cmd = [*NICE, sys.executable, "-m", "flows.cli", "run", "--images", str(images), "--workspace", str(ws)]
                log = self.logs / f"startup-{side}-{rep}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                before, now = load_average(), datetime.now()
                start_clock = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
                t = time.perf_counter()
                with log.open("w") as fh:
                    subprocess.run(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, check=True)
                run: dict[str, Any] = {"side": side, "code": str(root), "rep": rep, "load_before": before}
                run["wall"] = round(time.perf_counter() - t, 1)
                for line in log.read_text(errors="replace").splitlines():
                    m = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)", line)
                    if m is None:
                        continue
                    at = round(int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) - start_clock, 1)
                    if "Starting temporary server" in m[4]:
                        run["server_log_s"] = at
                    elif "Beginning flow run" in m[4]:
                        run["flow_begins_s"] = at
                runs.append(run)
                print(f"startup: {run}")
        mean = {side: round(sum(r["flow_begins_s"] for r in runs if r["side"] == side) / reps, 1) for side in sides}
        return self.record("startup", {"runs": runs, "mean_flow_begins_s": mean, "command": shlex.join(sys.argv)})

    def cluster(self, n: int, exact: bool) -> dict[str, Any]:
        key = f"cluster:{n}:{'exact' if exact else 'default'}"
        if (m := self.have(key)) is not None:
            return m
        cmd = [
            *NICE,
            sys.executable,
            str(Path(__file__).resolve()),
            "_cluster",
            str(n),
            *(["--exact"] if exact else []),
        ]
        m = measure(cmd, self.logs / f"cluster-{n}-{exact}.log", timeout=self.args.cluster_timeout)
        if not m["timed_out"]:
            m.update(child_json(Path(m["log"])))
        return self.record(key, {"n": n, "exact": exact, **m})

    def embed(self, n: int) -> dict[str, Any]:
        """Stage vs bare loop, in this process, alternating, best of ``--reps``."""
        import numpy as np
        import torch

        from tasks import descriptors, stages
        from tasks.config import load_params
        from tasks.embedding import Embedder, build_backbone, train_simclr
        from tasks.parallel import spans
        from tasks.workspace import Workspace

        ws = Workspace.at(self.ws / f"embed-{n}")
        fill_workspace(ws.root, images_set(self.data, n))
        params = load_params(PARAMS)
        stages.run_validate(ws, params)
        stages.run_standardize(ws, params)
        images = np.load(ws.stage_dir("standardize") / "images.npy")  # pre-decoded, in memory
        out: dict[str, Any] = {"n": len(images), "load_before": load_average(), "reps": self.args.reps}
        fns = {
            "stats": descriptors.stats_features,
            "lbp": descriptors.lbp_features,
            "morph": descriptors.morph_features,
        }

        def bare_combo() -> None:
            for kind in params.embed.blocks:
                if kind in fns:
                    for a, b in spans(len(images), params.runner.chunk):
                        fns[kind](images[a:b])
                    continue
                # a learned block: the same training loop (it is the compute), then a bare model(x) loop
                trained, _ = train_simclr(images, params.embed, params.base.seed)
                with torch.no_grad():
                    for a, b in spans(len(images), 256):
                        trained(torch.from_numpy(images[a:b].copy()))

        cnn_params = load_params(PARAMS, ["embed.method=cnn"])
        stages._set_threads(cnn_params)
        backbone, dim = build_backbone(cnn_params.embed.backbone, None)
        net = Embedder(backbone, dim, cnn_params.embed.input_size).eval()
        tensors = [torch.from_numpy(images[a:b].copy()) for a, b in spans(len(images), 256)]

        def bare_cnn() -> None:
            with torch.no_grad():
                for x in tensors:
                    net(x)

        cases = {
            "combo (default)": (lambda: stages.run_embed(ws, params), bare_combo),
            "cnn": (lambda: stages.run_embed(ws, cnn_params), bare_cnn),
        }
        for name, (stage_fn, bare_fn) in cases.items():
            times: dict[str, list[float]] = {"stage": [], "bare": []}
            for _ in range(self.args.reps):
                for side, fn in (("stage", stage_fn), ("bare", bare_fn)):
                    t = time.perf_counter()
                    fn()
                    times[side].append(round(time.perf_counter() - t, 2))
            stage_ips, bare_ips = len(images) / min(times["stage"]), len(images) / min(times["bare"])
            out[name] = {
                "seconds": times,
                "stage_img_s": round(stage_ips, 1),
                "bare_img_s": round(bare_ips, 1),
                "ratio": round(stage_ips / bare_ips, 3),
                "torch_threads": torch.get_num_threads(),
                "batch": params.runner.chunk if name.startswith("combo") else 256,
            }
            print(f"embed {name}: {out[name]}")
        out["load_after"] = load_average()
        return self.record(f"embed:{n}", out)

    def stats(self, n: int, root: Path | None = None) -> dict[str, Any]:
        """compute_stats vs a bare Pillow decode loop over the same files, alternating, best of ``--reps``."""
        from PIL import Image

        from tasks import quality
        from tasks.config import load_params
        from tasks.datasets import decode, discover

        key = f"stats:{n}" if root is None else f"stats:{root.name}"
        root = root or images_set(self.data, n)
        images = discover(root).images
        paths = [root / p for p in images]
        for p in paths:  # warm the page cache for both sides
            p.read_bytes()
        max_pixels = load_params(PARAMS).validate.max_pixels

        def bare_pillow() -> None:
            for p in paths:
                try:
                    with Image.open(p) as im:
                        im.load()
                except OSError:
                    pass  # the planted corrupt files

        def bare_decode() -> None:
            for p in paths:
                try:
                    decode(p, max_pixels)
                except Exception:  # noqa: BLE001
                    pass

        sides = {
            "compute_stats": lambda: quality.compute_stats(root, images, max_pixels),  # as the stage calls it
            "pillow_load": bare_pillow,
            "datasets_decode": bare_decode,
            "compute_stats_1_thread": lambda: quality.compute_stats(root, images, max_pixels, workers=1),
            "compute_stats_2_threads": lambda: quality.compute_stats(root, images, max_pixels, workers=2),
        }
        out: dict[str, Any] = {"n": len(images), "load_before": load_average(), "reps": self.args.reps}
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(self.args.reps):
            for name, fn in sides.items():
                t = time.perf_counter()
                fn()
                times[name].append(round(time.perf_counter() - t, 4))  # ms: the sides take ~0.3-0.4 s
        ips = {k: len(images) / min(v) for k, v in times.items()}
        out.update(
            seconds=times,
            img_s={k: round(v, 1) for k, v in ips.items()},
            ratio=round(ips["compute_stats"] / ips["pillow_load"], 3),
            # this VM's run-to-run noise is +-10 % on 0.3 s: the median of the paired repetitions beside the best
            ratio_median=round(statistics.median(times["pillow_load"]) / statistics.median(times["compute_stats"]), 3),
            ratio_1_thread=round(ips["compute_stats_1_thread"] / ips["pillow_load"], 3),
            default_workers=getattr(quality, "DEFAULT_WORKERS", 1),
            ratio_vs_datasets_decode=round(ips["compute_stats"] / ips["datasets_decode"], 3),
            load_after=load_average(),
        )
        return self.record(key, out)


# ------------------------------------------------------------------------------------------------ report


COMPUTE_PHASES = ("validate", "standardize", "embed", "cluster", "evaluate", "annotate", "publish")


def machinery_share(flow: dict[str, Any]) -> float | None:
    """Share of a flow run's wall time in phases that are machinery only (process start, Prefect server, DVC, model
    registration, shutdown): a lower bound of the overhead that does not depend on a second run at the same load."""
    log = Path(flow.get("log", ""))
    if not flow.get("log") or not log.is_file():
        return None
    start = flow.get("start_clock")
    if start is None:  # older measurements: the end time minus the duration
        end = datetime.fromisoformat(flow["at"])
        start = end.hour * 3600 + end.minute * 60 + end.second - flow["seconds"]
    phases = flow_phases(log, start, flow["seconds"])
    return round(sum(v for k, v in phases.items() if k not in COMPUTE_PHASES) / flow["seconds"], 3)


def ratios(state: dict[str, Any], mode: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The side-by-side ratios of one mode from the measurements."""
    m = {k.split("/", 1)[1]: v for k, v in state["measurements"].items() if k.startswith(f"{mode}/")}
    n, small, big, micro = sizes["n"], sizes["small"], sizes["big"], sizes["micro"]
    out: dict[str, Any] = {}
    if f"embed:{micro}" in m:
        e = m[f"embed:{micro}"]
        out["embed_vs_bare"] = {"value": e["combo (default)"]["ratio"], "cnn": e["cnn"]["ratio"], "n": e["n"]}
    if f"stats:{micro}" in m:
        s = m[f"stats:{micro}"]
        out["stats_vs_decode"] = {
            "value": s["ratio"],
            "median": s.get("ratio_median"),
            "vs_datasets_decode": s["ratio_vs_datasets_decode"],
            "one_thread": s.get("ratio_1_thread"),
            "default_workers": s.get("default_workers", 1),
            "n": s["n"],
        }
    if f"flow:{n}" in m and f"plain:{n}" in m:
        out["orchestration_overhead"] = orchestration(m, n)
    if f"flow:{small}" in m and f"flow:{big}" in m:
        a, b = m[f"flow:{small}"], m[f"flow:{big}"]
        out["rss_big_vs_small"] = {
            "value": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
            "tree": round(b["peak_tree_rss_mb"] / a["peak_tree_rss_mb"], 3),
            "small": small,
            "big": big,
        }
    if f"refresh:{small}" in m and f"refresh:{big}" in m:
        a, b = m[f"refresh:{small}"]["seconds"], m[f"refresh:{big}"]["seconds"]
        out["refresh_big_vs_small"] = {"value": round(b / a, 3), "small_s": a, "big_s": b, "small": small, "big": big}
    for key, r in out.items():
        op, target = TARGETS[key]
        r["target"] = f"{op} {target}"
        r["met"] = r["value"] >= target if op == ">=" else r["value"] <= target
    return out


def pair_key(side: str, n: int, pair: int, path: bool = False) -> str:
    """``flow:N`` / ``plain:N`` for the first pair (older measurements), ``flow:N#i`` for the pair ``i``; with
    ``path``, the workspace folder's name (``flow-N``, ``flow-N-pi``)."""
    if path:
        return f"{side}-{n}" + (f"-p{pair}" if pair else "")
    return f"{side}:{n}" + (f"#{pair}" if pair else "")


def started(measurement: dict[str, Any]) -> datetime:
    """When a measurement's command started: its end (``at``, UTC with the date) minus its duration."""
    return datetime.fromisoformat(measurement["at"]) - timedelta(seconds=measurement["seconds"])


def orchestration(m: dict[str, Any], n: int) -> dict[str, Any]:
    """``orchestration_overhead`` over every flow/plain pair of a mode.

    Whichever side of a pair runs first is the slower one on this VM (session 8: flow first 0.111-0.128, plain
    first 0.057-0.090, same code), so the value is the mean of the two orders' means (order-balanced) when both
    orders were measured."""
    pairs = []
    for i in itertools.count():
        f, p = m.get(pair_key("flow", n, i)), m.get(pair_key("plain", n, i))
        if f is None or p is None:
            break
        plain_first = started(p) < started(f)
        pairs.append(
            {
                "value": round((f["seconds"] - p["seconds"]) / f["seconds"], 3),
                "flow_s": f["seconds"],
                "plain_s": p["seconds"],
                "first": "plain" if plain_first else "flow",
                "machinery_s": f.get("machinery_s"),
                "load": {"flow": f.get("load_before"), "plain": p.get("load_before")},
            }
        )
    by_order = {
        first: round(statistics.mean(x["value"] for x in pairs if x["first"] == first), 3)
        for first in ("flow", "plain")
        if any(x["first"] == first for x in pairs)
    }
    value = statistics.mean(by_order.values())  # one order only (--pairs 1): that order's mean
    return {
        "value": round(value, 3),
        "order_balanced": len(by_order) == 2,
        "by_first_side": by_order,
        "median": round(statistics.median(x["value"] for x in pairs), 3),
        "pairs": pairs,
        "flow_s": round(statistics.mean(x["flow_s"] for x in pairs), 1),
        "plain_s": round(statistics.mean(x["plain_s"] for x in pairs), 1),
        "n": n,
        "machinery_share_from_flow_log": machinery_share(m[pair_key("flow", n, 0)]),
    }


def orchestration_cell(v: dict[str, Any]) -> str:
    pairs = v.get("pairs") or []
    extra = f"; {len(pairs)} pairs, order-balanced, median {v['median']:.3f}" if v.get("order_balanced") else ""
    return f"{v['value']:.3f} ({v['flow_s']:.0f} s vs {v['plain_s']:.0f} s{extra})"


def report(state: dict[str, Any]) -> str:
    """The ratios of every mode as one markdown table (what bench/RESULTS.md shows)."""
    names = {
        "embed_vs_bare": "embed stage / bare loop, images/s (combo; cnn in brackets)",
        "stats_vs_decode": "compute_stats / bare Pillow decode, images/s (vs datasets.decode in brackets)",
        "orchestration_overhead": "(autolabel run - plain functions) / autolabel run, wall",
        "rss_big_vs_small": "peak RSS big / small run (largest process; process tree in brackets)",
        "refresh_big_vs_small": "refresh of the same batch, big / small workspace, wall",
    }
    lines = ["| ratio | what | mode | sizes | value | target | met |", "|---|---|---|---|---|---|---|"]
    for key, what in names.items():
        for mode, r in state.get("ratios", {}).items():
            if key not in r:
                continue
            v = r[key]
            extra = {
                "embed_vs_bare": lambda v: f"{v['value']:.2f} ({v['cnn']:.2f})",
                "stats_vs_decode": lambda v: f"{v['value']:.2f} ({v['vs_datasets_decode']:.2f})",
                "orchestration_overhead": orchestration_cell,
                "rss_big_vs_small": lambda v: f"{v['value']:.2f} ({v['tree']:.2f})",
                "refresh_big_vs_small": lambda v: f"{v['value']:.2f} ({v['big_s']:.0f} s vs {v['small_s']:.0f} s)",
            }[key](v)
            size = f"{v['small']:,} → {v['big']:,}" if "big" in v else f"{v['n']:,}"
            lines.append(
                f"| `{key}` | {what} | {mode} | {size} | {extra} | {v['target']} | {'yes' if v['met'] else 'no'} |"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        return plain_child(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "_ratios":  # recompute every mode's ratios (keeps commands and loads)
        state = json.loads(RESULTS.read_text())
        for mode, r in state.get("ratios", {}).items():
            keep = {k: r[k] for k in ("sizes", "command", "uptime_start", "uptime_end") if k in r}
            state["ratios"][mode] = {**keep, **ratios(state, mode, r["sizes"])}
        RESULTS.write_text(json.dumps(state, indent=2, default=str) + "\n")
        return print(report(state))
    if len(sys.argv) > 1 and sys.argv[1] == "_report":
        return print(report(json.loads(RESULTS.read_text())))
    if len(sys.argv) > 1 and sys.argv[1] == "_cluster":
        return cluster_child(int(sys.argv[2]), "--exact" in sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: --n 2000 --sizes 2000 10000")
    ap.add_argument("--n", type=int, help="images for the orchestration overhead (default 10000; quick 2000)")
    ap.add_argument("--sizes", type=int, nargs=2, help="small and large set for RSS and refresh (10000 50000)")
    ap.add_argument("--micro-n", type=int, default=2000, help="images for embed_vs_bare and stats_vs_decode")
    ap.add_argument("--stats-dir", type=Path, nargs="*", default=[], help="also stats_vs_decode on these folders")
    ap.add_argument("--batch", type=int, default=1000, help="new images per refresh")
    ap.add_argument("--cluster-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--exact-n", type=int, nargs="*", default=[100_000], help="also cluster without the size switch")
    ap.add_argument("--cluster-timeout", type=float, default=1200.0, help="seconds per clustering child")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of the in-process ratios")
    ap.add_argument(
        "--parts",
        nargs="*",
        default=["embed", "stats", "orchestration", "rss", "refresh", "cluster"],
        help="what to measure (also: startup, not in the default set)",
    )
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/perf"))
    ap.add_argument("--reuse", action="store_true", help="keep measurements already in perf.json (and workspaces)")
    ap.add_argument("--empty-trash", action="store_true", help="delete the workspaces set aside, after measuring")
    ap.add_argument("--startup-reps", type=int, default=3, help="startup: alternating runs per side")
    ap.add_argument("--startup-baseline", type=Path, help="startup: also run this checkout (e.g. a git worktree)")
    ap.add_argument("--plain-first", action="store_true", help="orchestration: plain functions before the flow")
    ap.add_argument(
        "--pairs", type=int, default=2, help="orchestration: flow/plain pairs, alternating which side runs first"
    )
    ap.add_argument("--mode", help="name the measurements are kept under (default: quick or full)")
    args = ap.parse_args()
    args.n = args.n or (2000 if args.quick else 10_000)
    small, big = args.sizes or ((2000, 10_000) if args.quick else (10_000, 50_000))
    mode = args.mode = args.mode or ("quick" if args.quick else "full")
    bench = Bench(args)
    start_load = uptime()
    for part in args.parts:
        if part == "embed":
            bench.embed(args.micro_n)
        elif part == "stats":
            bench.stats(args.micro_n)
            for folder in args.stats_dir:
                bench.stats(0, folder)
        elif part == "orchestration":  # pairs alternate which side runs first: that evens out the first-run penalty
            for pair in range(args.pairs):
                plain_first = args.plain_first != (pair % 2 == 1)
                for side in (bench.plain, bench.flow) if plain_first else (bench.flow, bench.plain):
                    side(args.n, pair)
        elif part == "rss":
            bench.flow(small)
            bench.flow(big)
        elif part == "refresh":
            bench.refresh(small)
            bench.refresh(big)
        elif part == "startup":
            bench.startup(args.startup_reps, args.startup_baseline)
        elif part == "cluster":
            for n in args.cluster_sizes:
                bench.cluster(n, exact=False)
            for n in args.exact_n:
                bench.cluster(n, exact=True)
        else:
            raise SystemExit(f"unknown part {part!r}")
    sizes = {"n": args.n, "small": small, "big": big, "micro": args.micro_n}
    bench.state.setdefault("ratios", {})[mode] = {
        "sizes": sizes,
        "command": shlex.join(sys.argv),
        "uptime_start": start_load,
        "uptime_end": uptime(),
        **ratios(bench.state, mode, sizes),
    }
    bench.save()
    print(json.dumps(bench.state["ratios"][mode], indent=2))
    if args.empty_trash:  # after the timed runs: deleting is what slows the next file creations (set_aside)
        for trash in args.data_dir.glob("*/.trash"):
            shutil.rmtree(trash, ignore_errors=True)


if __name__ == "__main__":
    main()
