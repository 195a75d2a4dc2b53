"""The ``autolabel`` command line."""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows import environment

app = typer.Typer(
    help="Turn folders of unlabelled AOI defect images into reviewed, versioned, traceable label sets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------ start-up

_PREFECT_TEMPLATE_CODE = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()

asyncio.run(main())
"""


def _prefect_template(version: str) -> Path | None:
    """An empty Prefect database with every migration applied and the block types registered, made once per
    machine and Prefect version (what the temporary server would otherwise do in each new workspace: 60 % of its
    start-up, 12-20 s on 2 loaded cores). None when it cannot be made (the server then migrates as before)."""
    from tasks import dbtemplates

    def env(tmp: Path) -> dict[str, str]:
        return {"PREFECT_HOME": str(tmp), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db"}

    return dbtemplates.template("prefect", version, _PREFECT_TEMPLATE_CODE, env)


def _new_prefect_db(db: Path, version: str) -> None:
    """A workspace without a Prefect database gets a copy of :func:`_prefect_template`, when there is one."""
    if not db.exists() and (template := _prefect_template(version)) is not None:
        from tasks.dbtemplates import copy_into

        copy_into(template, db)


_PREFECT_SETTING_FILES = ("prefect.toml", ".env", "pyproject.toml")
"""Files in the working directory Prefect 3 reads settings from (pyproject.toml: its ``[tool.prefect]`` table)."""


def _plain_ephemeral_setup() -> bool:
    """Whether Prefect's settings can only come from the environment and say "temporary server, default database"
    (decided without importing Prefect): no API URL, no profile file, no settings file in the working directory,
    no database URL, no explicit ephemeral switch. Anything else takes Prefect's own path."""
    env = os.environ
    home = env.get("PREFECT_HOME")
    if not home or env.get("PREFECT_API_URL") or env.get("PREFECT_PROFILES_PATH"):
        return False
    own = ("PREFECT_API_DATABASE", "PREFECT_SERVER_DATABASE", "PREFECT_SERVER_EPHEMERAL_ENABLED")
    if any(key.startswith(own) for key in env):
        return False
    if (Path(home) / "profiles.toml").exists():
        return False
    cwd = Path.cwd()
    for name in _PREFECT_SETTING_FILES:
        f = cwd / name
        if f.is_file() and (name != "pyproject.toml" or "[tool.prefect" in f.read_text(errors="replace")):
            return False
    return True


def _spawn_server_process(db: Path, version: str) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start the temporary server's process the way Prefect's ``SubprocessASGIServer`` does (same command, same
    environment), before Prefect is imported: its 3-4 s boot then overlaps this process's 2 s of importing Prefect
    instead of following it. None when Prefect is not found or the port search fails."""
    import importlib.util
    import random
    import socket

    _new_prefect_db(db, version)
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        return None
    app_dir = str(Path(spec.origin).parent.parent)
    for _ in range(10):  # Prefect's own range and retries
        port = random.choice(range(8000, 9000))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        cmd = [
            sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return subprocess.Popen(cmd, env=env), port
    return None


def _adopt_server_process(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Make the process Prefect's temporary server singleton (what ``SubprocessASGIServer.start`` would have made:
    the flow's client finds it, and it is stopped at exit), once it answers ``/health``. False, with the process
    stopped, when it does not (e.g. the port was taken meanwhile): the caller then lets Prefect start its own."""
    import httpx
    from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if server.running:  # started meanwhile by someone else: ours is not needed
        proc.terminate()
        proc.wait()
        return True
    server.port, server.server_process, server.running = port, proc, True
    atexit.register(server.stop)
    subprocess_server_logger.info(f"Starting temporary server on {server.address} (started before Prefect's import)")
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client() as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.get(f"{server.api_url}/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    server.stop()
    return False


def _start_prefect_server() -> None:
    """Start the temporary Prefect server the flow would start on its first API call (the same singleton, so the
    flow reuses it); a new workspace's database is first copied from :func:`_prefect_template`. In the plain
    setup (:func:`_plain_ephemeral_setup`) the server's process starts before Prefect is imported."""
    try:
        from importlib.metadata import version

        spawned = None
        if _plain_ephemeral_setup():
            spawned = _spawn_server_process(Path(os.environ["PREFECT_HOME"]) / "prefect.db", version("prefect"))
        import prefect
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            if spawned is not None:
                spawned[0].terminate()
            return
        if spawned is not None and _adopt_server_process(*spawned):
            return
        db = Path(settings.home) / "prefect.db"
        url = settings.server.database.connection_url
        default_db = url is None or url.get_secret_value() in ("", f"sqlite+aiosqlite:///{db}")
        if default_db:
            _new_prefect_db(db, prefect.__version__)
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()
    except Exception:  # noqa: BLE001 - the flow starts (or fails to start) the server itself, with its own error
        logging.getLogger("autolabel").debug("early Prefect server start failed", exc_info=True)


def _prefect_server_early() -> threading.Thread:
    """Start the temporary Prefect server in a thread, so its start-up (10-30 s) overlaps this process's imports
    (8-20 s); join the thread before the flow runs. With ``PREFECT_API_URL`` set it does nothing."""
    thread = threading.Thread(target=_start_prefect_server, name="prefect-server-start", daemon=True)
    thread.start()
    return thread


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be new or empty).")],
    n: Annotated[int, typer.Option("--n", help="Number of images (>= 50).")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives byte-identical files.")] = 0,
) -> None:
    """Write the built-in synthetic AOI data set of IC-package defects, with labels.csv and planted bad files."""
    from tasks.synthetic import generate

    try:
        report = generate(out, n=n, seed=seed)
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.class_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"{report.n_images} images ({counts}); {len(report.planted)} planted bad files")
    print(report.out)


@app.command()
def run(
    images: Annotated[
        Path | None,
        typer.Option(
            help="Folder of images (searched recursively). Omit it to retrain on the workspace's own data: "
            "its last image folder plus every batch `autolabel refresh` added, with the workspace's params.yaml."
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Ground-truth CSV (path,label; paths relative to --images).")
    ] = None,
    workspace: Annotated[Path, typer.Option(help="Workspace folder (git + DVC repo, created if new).")] = Path(
        "workspace"
    ),
    params: Annotated[
        Path | None, typer.Option("--params", help="params.yaml to use (default: ./params.yaml if present).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override one parameter, e.g. --set embed.epochs=5.")
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option(
            help="Defect-free templates: each image is compared with its template and the defect patches cut from "
            "it are labelled instead of the whole image. Pairing (--set localize.rule=...): same-name (default) = "
            "TEMPLATES/<image path relative to --images>; suffix = <stem>_test.<ext> pairs with <stem>_temp.<ext> "
            "in the same sub-folder of TEMPLATES (pass --images itself when they sit side by side; templates are "
            "never labelled); single = TEMPLATES is one golden image for all. Images without a usable template "
            "are labelled whole (localize.unpaired=passthrough) or skipped (skip); every one is listed in "
            "WS/results/localize/unlocalized.csv. --labels paths then name patches (see boxes.csv there)."
        ),
    ] = None,
) -> None:
    """Run the retrain flow and publish a label set; the last line printed is the label set's path."""
    from tasks.config import ParamsError, load_params

    params_file = params if params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    try:
        resolved = load_params(params_file, overrides)  # fail on bad params before anything starts
    except ParamsError as exc:
        _fail(str(exc))
    if images is not None and not images.is_dir():
        _fail(f"image folder not found: {images}")
    if labels is not None and not labels.is_file():
        _fail(f"labels file not found: {labels}")
    if templates is not None:
        from tasks.localize import check_templates

        if images is None:
            _fail("--templates needs --images: the raw images the templates belong to")
        try:
            check_templates(templates, images, resolved.localize.rule)
        except ValueError as exc:
            _fail(f"--templates: {exc}")
    environment.configure(workspace)
    server = _prefect_server_early()
    from flows.retrain import retrain

    server.join()

    try:
        path = retrain(
            images=str(images.resolve()) if images else None,
            workspace=str(workspace),
            labels=str(labels.resolve()) if labels else None,
            params_file=str(params_file.resolve()) if params_file else None,
            overrides=list(overrides or []),
            templates=str(templates.resolve()) if templates else None,
        )
    except Exception as exc:  # every failure ends in one clear line; the traceback is in the Prefect log
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    _summary(workspace, Path(path))
    print(path)


def _summary(workspace: Path, path: Path) -> None:
    from tasks.tracking import tracking_uri
    from tasks.workspace import Workspace

    ws = Workspace.at(workspace)
    uri = tracking_uri(ws)
    mlflow_ui = (
        f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        if uri.startswith("sqlite:")
        else f"open {uri}"
    )
    prefect_ui = (
        f"PREFECT_HOME={ws.prefect_home} .venv/bin/prefect server start --host 127.0.0.1 --port 4200"
        if not os.environ.get("PREFECT_API_URL")
        else f"open {os.environ['PREFECT_API_URL'].removesuffix('/api')}"
    )
    console.print(
        f"\n[bold green]Label set published[/]\n"
        f"  labels     {path / 'labels.csv'}\n"
        f"  montages   {path / 'montages'}/\n"
        f"  manifest   {path / 'manifest.json'}\n"
        f"  quarantine {ws.stage_dir('validate') / 'quarantine.csv'}\n"
        f"  metrics    {ws.stage_dir('evaluate') / 'metrics.json'}\n"
        f"  MLflow     {uri}\n"
        f"Open the UIs on this workspace:\n"
        f"  MLflow:  {mlflow_ui}\n"
        f"  Prefect: {prefect_ui}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def refresh(
    images: Annotated[Path, typer.Option(help="Folder of the new batch of images (searched recursively).")],
    workspace: Annotated[Path, typer.Option(help="A workspace trained by `autolabel run`.")] = Path("workspace"),
    batch: Annotated[
        str | None, typer.Option(help="Batch name (default: a content id, so the same batch is recognised).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override one parameter, e.g. --set refresh.max_psi=0.5.")
    ] = None,
    no_retrain: Annotated[bool, typer.Option("--no-retrain", help="Report drift but never trigger a retrain.")] = False,
) -> None:
    """Label a new batch with the @champion models (no training); retrain when it has drifted.

    The batch is versioned with DVC beside the training data (data/batches/<id>), checked with the same quality
    suite, embedded and assigned by the registry's champion embedder and clusterer, and published as an
    incremental label set. Drift beyond params.yaml's `refresh` limits triggers the retrain flow on all the data.
    """
    import json

    from tasks.config import ParamsError, load_params
    from tasks.workspace import Workspace

    ws = Workspace.at(workspace)
    try:
        load_params(ws.params if ws.params.is_file() else None, overrides)
    except ParamsError as exc:
        _fail(str(exc))
    if not images.is_dir():
        _fail(f"image folder not found: {images}")
    environment.configure(workspace)
    server = _prefect_server_early()
    from flows.refresh import refresh as refresh_flow

    server.join()

    try:
        result = refresh_flow(
            images=str(images.resolve()),
            workspace=str(workspace),
            batch=batch,
            overrides=list(overrides or []),
            allow_retrain=not no_retrain,
        )
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    if result.get("skipped"):
        console.print(f"nothing to do: {result['skipped']}", highlight=False, soft_wrap=True)
        return
    d = result["drift"]
    console.print(
        f"\n[bold green]Batch {result['batch_id']} labelled[/] with the @champion models\n"
        f"  drift: far share {d['far_share']:.3f}, PSI {d['psi']:.3f}, mean shift {d['mean_shift']:.3f} -> "
        f"{'DRIFT: ' + '; '.join(d['reasons']) if d['drifted'] else 'no drift'}\n"
        + (f"  retrained: {result['retrain_labelset']}\n" if result.get("retrain_labelset") else ""),
        highlight=False,
        soft_wrap=True,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "drift"}))
    print(result["labelset"])


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="validate | standardize | embed | cluster | evaluate | publish")],
    workspace: Annotated[Path, typer.Option(help="Workspace folder (dvc repro runs this in it).")] = Path("."),
) -> None:
    """Run one pipeline stage in a workspace, reading its params.yaml (what dvc.yaml's stages call)."""
    from tasks import champion, stages, tracking, versioning
    from tasks.config import ParamsError, load_params
    from tasks.workspace import STAGES, Workspace

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    environment.configure(None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ws = Workspace.at(workspace)
    try:
        params = load_params(ws.params)
    except ParamsError as exc:
        _fail(str(exc))
    try:
        if name != "publish":
            getattr(stages, f"run_{name}")(ws, params)
            return
        data = {**versioning.current_data_version(ws), "remote": versioning.recorded_remote(ws)}
        code = versioning.code_version()
        run_id = tracking.start_run(
            ws,
            params.track.experiment,
            "dvc-repro",
            params.as_dict(),
            {**tracking.lineage_tags(data, code, params.digest()), "autolabel.driver": "dvc"},
        )
        for s in STAGES[:-1]:
            tracking.log_metrics(ws, run_id, s, ws.read_json(s))
        models = stages.run_track(ws, params, run_id)
        models = champion.record(ws, run_id, champion.gate(ws, params, models), models)
        context = stages.publish_context(ws, params, run_id, data, code, models)
        path = stages.run_publish(ws, params, context)
        tracking.log_artifacts(ws, run_id, path, f"labelset/{path.name}")
        tracking.end_run(ws, run_id)
        print(path)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)


@app.command("lineage")
def lineage_cmd(
    labelset: Annotated[Path, typer.Argument(help="A label set folder (WS/labelsets/<id>).")],
    image: Annotated[str | None, typer.Option(help="One image (path as in labels.csv).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Trace a label set, or one image in it, back to its data, code, params, models, quality and run."""
    from tasks.lineage import LabelSetError, lineage

    try:
        chain = lineage(labelset, image)
    except (LabelSetError, KeyError) as exc:
        _fail(str(exc).strip("'\""))
    if as_json:
        print(json.dumps(chain, indent=2, sort_keys=True, default=str))
        return
    from rich.table import Table

    table = Table(title=f"lineage of {image or 'label set ' + chain['labelset']['id']}", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for section, value in chain.items():
        if section == "params":
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                table.add_row(
                    f"{section}.{key}", json.dumps(item, default=str) if isinstance(item, dict | list) else str(item)
                )
        else:
            table.add_row(section, str(value))
    Console().print(table)


@app.command("verify")
def verify_cmd(
    labelset: Annotated[Path, typer.Argument(help="A label set folder.")],
    remote: Annotated[bool, typer.Option(help="Also check the data version in the DVC remote.")] = True,
) -> None:
    """Recompute checksums; check that the run, model versions and data still exist. Exit 0 only if all hold."""
    environment.configure(None)
    from tasks.lineage import LabelSetError, verify

    try:
        result = verify(labelset, check_remote=remote)
    except LabelSetError as exc:
        _fail(str(exc))
    for item in result.checked:
        console.print(f"[green]ok[/]   {item}", highlight=False)
    for problem in result.problems:
        console.print(f"[red]FAIL[/] {problem}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)
    print(f"verified {labelset}")


@app.command("diff")
def diff_cmd(
    a: Annotated[Path, typer.Argument(help="The older label set.")],
    b: Annotated[Path, typer.Argument(help="The newer label set.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What changed between two label sets: images added and removed, labels changed, and the causes."""
    from tasks.lineage import LabelSetError, diff

    try:
        d = diff(a, b)
    except LabelSetError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    print(
        f"{d['a']} → {d['b']}: {len(d['added'])} added, {len(d['removed'])} removed, "
        f"{len(d['label_changed'])} labels changed, {d['unchanged']} unchanged"
    )
    for cause in d["causes"] or ["no change in data, params, models, code or human input"]:
        print(f"  cause: {cause}")
    for row in d["label_changed"][:20]:
        print(f"  {row['image']}: {row['from']} → {row['to']}")


@app.command("restore")
def restore_cmd(
    labelset: Annotated[Path, typer.Argument(help="A label set folder.")],
    to: Annotated[Path, typer.Option("--to", help="Empty or new folder for the images.")],
) -> None:
    """Check out the exact images of a label set's data version from the DVC remote (sha256-verified)."""
    from tasks.lineage import LabelSetError, restore

    try:
        info = restore(labelset, to)
    except (LabelSetError, FileExistsError, RuntimeError) as exc:
        _fail(str(exc))
    print(
        f"restored {info['files']} files of data version {info['data_md5']} to {info['to']} "
        f"({info['verified_sha256']} labelled images sha256-verified)"
    )


@app.command("annotate")
def annotate_cmd(
    workspace: Annotated[Path, typer.Option(help="Workspace of a previous `autolabel run`.")] = Path("workspace"),
    cluster_names: Annotated[
        Path | None, typer.Option(help="YAML: cluster id → label ('3: crack'); several clusters may share a label.")
    ] = None,
    seeds: Annotated[Path | None, typer.Option(help="CSV image,label for a few images.")] = None,
) -> None:
    """Apply human cluster names and seed labels, propagate, and publish a new label set (no retraining)."""
    from tasks.annotation import HumanInputError

    for path in (cluster_names, seeds):
        if path is not None and not path.is_file():
            _fail(f"file not found: {path}")
    environment.configure(workspace)
    from flows.annotate import annotate

    try:
        path = annotate(
            workspace=str(workspace),
            cluster_names=str(cluster_names.resolve()) if cluster_names else None,
            seeds=str(seeds.resolve()) if seeds else None,
        )
    except HumanInputError as exc:
        _fail(str(exc))
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    _summary(workspace, Path(path))
    print(path)


@app.command("label-next")
def label_next_cmd(
    workspace: Annotated[Path, typer.Option(help="Workspace of a previous `autolabel run`.")] = Path("workspace"),
    n: Annotated[int, typer.Option("--n", min=1, help="How many images to ask for.")] = 20,
) -> None:
    """List the images a human should label next for the most gain (CSV + montage); prints the CSV path."""
    from tasks.labelnext import write_label_next

    environment.configure(None)
    try:
        csv_path = write_label_next(workspace, n)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"montage: {csv_path.with_suffix('.png')}", highlight=False)
    print(csv_path)


@app.command("simulate")
def simulate_cmd(
    images: Annotated[Path, typer.Option(help="Folder of images.")],
    labels: Annotated[Path, typer.Option(help="Ground truth (path,label) that plays the human.")],
    budget: Annotated[float, typer.Option(help="Share of the images the human labels, e.g. 0.02.")],
    workspace: Annotated[Path, typer.Option(help="Workspace folder.")] = Path("workspace"),
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of label-next → label → propagate.")] = 4,
    retrain: Annotated[bool, typer.Option(help="Run the retrain flow first (else reuse the workspace's).")] = True,
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml to use.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one parameter (with --no-retrain: on top of the workspace's params)."),
    ] = None,
) -> None:
    """Play the human from ground truth: label-next in rounds until the budget is spent, propagate, measure."""
    from tasks.config import ParamsError, load_params

    params_file = params if params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    try:
        load_params(params_file, overrides)
    except ParamsError as exc:
        _fail(str(exc))
    if not 0 < budget <= 1:
        _fail(f"--budget must be a share of the images in (0, 1], got {budget}")
    if params is not None and not retrain:
        _fail(
            "--params is for the retrain; with --no-retrain the workspace's recorded params.yaml is used "
            "(change a setting with --set KEY=VALUE)"
        )
    environment.configure(workspace)
    if retrain:
        from flows.retrain import retrain as retrain_flow

        try:
            retrain_flow(
                images=str(images.resolve()),
                workspace=str(workspace),
                labels=str(labels.resolve()),
                params_file=str(params_file.resolve()) if params_file else None,
                overrides=list(overrides or []),
            )
        except Exception as exc:
            _fail(f"{type(exc).__name__}: {exc}", code=1)
    from tasks.labelnext import run_simulation

    metrics_path = run_simulation(workspace, labels, budget, rounds, list(overrides or []))
    metrics = json.loads(metrics_path.read_text())
    console.print(
        f"labels used {metrics['labels_used']} of {metrics['n_images']} ({budget:.1%}): overall accuracy "
        f"{metrics['overall_accuracy']:.3f}, auto-accepted accuracy {metrics['auto_accepted_accuracy']:.3f} at "
        f"coverage {metrics['coverage']:.3f}, macro recall {metrics['macro_recall']:.3f}",
        highlight=False,
    )
    print(metrics_path)


@app.command("deploy")
def deploy_cmd(
    inbox: Annotated[Path, typer.Option(help="Folder where new batches arrive: the nightly refresh labels it.")],
    workspace: Annotated[Path, typer.Option(help="The workspace both deployments work in.")] = Path("workspace"),
    pool: Annotated[str, typer.Option(help="Prefect work pool (type process; created if missing).")] = "autolabel",
    refresh_cron: Annotated[str, typer.Option(help="Cron of refresh-nightly.")] = "0 2 * * *",
    retrain_cron: Annotated[str, typer.Option(help="Cron of retrain-weekly.")] = "0 3 * * 0",
    timezone: Annotated[str, typer.Option(help="Time zone of both crons (IANA name).")] = "UTC",
    pool_concurrency: Annotated[
        int, typer.Option(min=0, help="Concurrency limit of a new pool (1: runs wait for each other; 0: none).")
    ] = 1,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Parameter override passed to every scheduled run.")
    ] = None,
) -> None:
    """Register refresh-nightly and retrain-weekly on a Prefect server (PREFECT_API_URL) for a process worker.

    Start the worker on this machine, in an environment with the services' settings (source RUN_DIR/env.sh):
    `prefect worker start --pool autolabel --type process`. Same deployments as infra/prefect.yaml.
    """
    if not os.environ.get("PREFECT_API_URL"):
        _fail("deployments need a Prefect server: set PREFECT_API_URL (source RUN_DIR/env.sh after infra/local/up.sh)")
    environment.configure(None)
    from flows import deploy

    try:
        ids = deploy.register(
            inbox,
            workspace,
            pool=pool,
            refresh_cron=refresh_cron,
            retrain_cron=retrain_cron,
            timezone=timezone,
            overrides=list(overrides or []),
            pool_concurrency=pool_concurrency,
        )
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    for name, deployment_id in ids.items():
        console.print(f"registered {name} on pool {pool}", highlight=False)
        print(f"{name} {deployment_id}")


def main() -> None:
    """The ``autolabel`` command. After the command, exit without the interpreter's teardown.

    The exit hooks still run (Prefect sends its queued logs and events, its temporary server stops, log handlers and
    MLflow flush, temporary folders go), then the process ends. What is skipped is freeing every module and object
    one by one, which after a run (torch, its thread pools, a few GB of arrays) took 2-4 s of a command's wall time
    with nothing left to do.
    """
    try:
        app()
        code: int = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # a normal exit's first two steps, in its order: join the threads and run their exit hooks (Prefect drains its
    # log and event queues to the API there), then the atexit handlers; os._exit skips only the teardown after them
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
