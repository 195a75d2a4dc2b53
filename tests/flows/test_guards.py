"""Guards that stop bad runs before any work: bad params, missing folders, a busy workspace."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_bad_params_stop_before_any_work(tmp_path, synth_data):
    ws = tmp_path / "ws"
    for override, key in (
        ("embed.epochs=-1", "embed.epochs"),
        ("cluster.kk=3", "cluster.kk: unknown key"),
        ("validate.max_fail_share=2", "validate.max_fail_share"),
    ):
        result = runner.invoke(app, ["run", "--images", str(synth_data), "--workspace", str(ws), "--set", override])
        assert result.exit_code == 2 and key in result.output, result.output
    assert not ws.exists()  # nothing was created


def test_missing_folders_are_clear_errors(tmp_path):
    result = runner.invoke(app, ["run", "--images", str(tmp_path / "nope"), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "image folder not found" in result.output
    result = runner.invoke(app, ["label-next", "--workspace", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "run `autolabel run` first" in result.output


@pytest.mark.flow
def test_second_run_on_a_busy_workspace_stops_with_a_clear_message(prefect_engine, synth_data, tmp_path):
    from flows.retrain import WorkspaceBusyError, retrain

    ws = tmp_path / "ws"
    ws.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            f"l = FileLock({str(ws / '.autolabel.lock')!r}); l.acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(WorkspaceBusyError, match="another run is using the workspace"):
            retrain(images=str(synth_data), workspace=str(ws))
        assert time.perf_counter() - start < 30
        assert sorted(p.name for p in ws.iterdir()) == [".autolabel.lock"]  # nothing touched
    finally:
        holder.kill()
        holder.wait()


def test_the_command_keeps_its_exit_code_and_output_when_it_skips_the_teardown(tmp_path):
    """``flows.cli.main`` ends with ``os._exit`` after the exit handlers: codes and piped output must survive."""
    cli = [sys.executable, "-m", "flows.cli"]
    made = subprocess.run([*cli, "synth", str(tmp_path / "s"), "--n", "50"], capture_output=True, text=True)
    assert made.returncode == 0 and made.stdout.strip().endswith(str(tmp_path / "s"))  # piped stdout was flushed
    missing = subprocess.run([*cli, "run", "--images", str(tmp_path / "nope"), "--workspace", str(tmp_path / "w")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "image folder not found" in missing.stdout + missing.stderr
    unknown = subprocess.run([*cli, "no-such-command"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "No such command" in unknown.stdout + unknown.stderr
    assert not (tmp_path / "w").exists()
