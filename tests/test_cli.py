"""The command line, run as a user runs it: in a subprocess."""

import subprocess
import sys

import pytest


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dasknmf", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_demo_runs_end_to_end(tmp_path):
    result = _run(
        "demo",
        "--rows",
        "3000",
        "--cols",
        "60",
        "--rank",
        "3",
        "-k",
        "3",
        "--workers",
        "2",
        "--workdir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "LocalCluster: 2 workers" in result.stdout
    assert "Done in" in result.stdout and "iterations, reconstruction error" in result.stdout
    assert "NMF:" in result.stderr  # the progress bar
    assert (tmp_path / "example.zarr").is_dir()


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--rows", "10", "--cols", "5", "-k", "8"], "must be at most min(rows, cols) = 5"),
        (["demo", "--rows", "1"], "Invalid value for '--rows'"),
        (["demo", "--frobnicate"], "No such option"),
        (["fly"], "No such command 'fly'"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = _run("--version")
    assert result.returncode == 0 and "dasknmf, version" in result.stdout
