"""The command line, run as a user runs it: in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import last_json, low_rank, run_cli

import dasknmf
from dasknmf import NMF


def test_demo_runs_end_to_end(tmp_path):
    result = run_cli(
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
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and "dasknmf, version" in result.stdout


# ---- the batch pipeline: convert -> fit -> transform -> info -> plot --------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A rank-4 matrix as .npy, and as Zarr (through `dasknmf convert`)."""
    folder = tmp_path_factory.mktemp("cli")
    X = low_rank(1200, 40, 4).astype(np.float32)
    np.save(folder / "X.npy", X)
    record = last_json(run_cli("convert", str(folder / "X.npy"), str(folder / "X.zarr"), "--json"))
    assert record["shape"] == [1200, 40] and record["format"] == "dense"
    return folder, X


def test_fit_transform_info_plot(stored, tmp_path):
    folder, X = stored
    model = tmp_path / "model.zarr"
    fit = last_json(
        run_cli(
            "fit",
            str(folder / "X.zarr"),
            "-k",
            "4",
            "-o",
            str(model),
            "--workers",
            "1",
            "--init",
            "random",
            "--random-state",
            "0",
            "--max-iter",
            "40",
            "--tol",
            "0",
            "--json",
        )
    )
    assert fit["n_iter"] == 40 and fit["output"] == str(model)
    reference = NMF(n_components=4, init="random", random_state=0, max_iter=40, tol=0).fit(X)
    assert fit["reconstruction_err"] == pytest.approx(reference.reconstruction_err_, rel=1e-5)
    fitted = dasknmf.load(model)
    np.testing.assert_allclose(fitted.components_, reference.components_, rtol=1e-4, atol=1e-6)

    W_path = tmp_path / "W.zarr"
    out = last_json(
        run_cli(
            "transform",
            str(model),
            str(folder / "X.zarr"),
            "-o",
            str(W_path),
            "--workers",
            "1",
            "--json",
        )
    )
    assert out["shape"] == [1200, 4]
    np.testing.assert_allclose(
        dasknmf.open_matrix(W_path).compute(), reference.transform(X), rtol=1e-3, atol=1e-4
    )

    info = last_json(run_cli("info", str(model), "--json"))
    assert info["kind"] == "model" and info["n_iter"] == 40 and info["n_components"] == 4
    assert info["layout"]["scheme"] == "rows" and info["layout"]["panels"] >= 1
    text = run_cli("info", str(folder / "X.zarr"))
    assert "shape: [1200, 40]" in text.stdout and "format: dense" in text.stdout
    assert f"nnz: {np.count_nonzero(X)}" in text.stdout

    pytest.importorskip("matplotlib")
    plot = run_cli("plot", str(model), "-o", str(tmp_path / "loss.png"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_without_extrapolation(stored, tmp_path):
    folder, X = stored
    model = tmp_path / "model.zarr"
    settings = ["-k", "3", "--init", "random", "--random-state", "0", "--max-iter", "8"]
    result = run_cli("fit", str(folder / "X.zarr"), "-o", str(model), "--workers", "1",
                  "--tol", "0", "--no-extrapolate", *settings)  # fmt: skip
    assert result.returncode == 0, result.stderr
    fitted = dasknmf.load(model)
    reference = NMF(3, init="random", random_state=0, max_iter=8, tol=0, extrapolate=False)
    reference.fit(X)
    assert fitted.extrapolate is False
    np.testing.assert_allclose(fitted.components_, reference.components_, rtol=1e-4, atol=1e-6)


def test_info_on_a_sparse_store(tmp_path):
    import scipy.sparse as sp

    X = sp.random(50, 30, density=0.1, format="csr", random_state=0)
    dasknmf.save_matrix(tmp_path / "S.zarr", X)
    info = last_json(run_cli("info", str(tmp_path / "S.zarr"), "--json"))
    assert info["format"] == "csr" and info["nnz"] == X.nnz and info["shape"] == [50, 30]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "{X}", "-k", "2", "-o", "{existing}"], "already exists; pass --overwrite"),
        (["fit", "{tmp}/none.zarr", "-k", "2", "-o", "{out}"], "does not exist"),
        (["fit", "{X}", "-k", "0", "-o", "{out}"], "Invalid value for '-k'"),
        (
            ["fit", "{X}", "-k", "2", "-o", "{out}", "--solver", "als"],
            "Invalid value for '--solver'",
        ),
        (["fit", "{X}", "-k", "2", "-o", "{out}", "--beta-loss", "kl"], "'beta_loss' parameter"),
        (["fit", "{X}", "-k", "2", "-o", "{out}", "--alpha-h", "x"], "--alpha-h must be a number"),
        (["fit", "{X}", "-k", "2", "-o", "{out}", "--resume"], "no checkpoint in"),
        (
            ["fit", "{X}", "-k", "2", "-o", "{out}", "--solver", "mu", "--extrapolate"],
            "'extrapolate' parameter of NMF applies to solver 'cd'/'hals' only",
        ),
        (
            ["fit", "{X}", "-k", "2", "-o", "{out}", "--workers", "1", "--scheduler-address", "x"],
            "--workers sizes the default LocalCluster only",
        ),
        (["fit", "{npy}", "-k", "2", "-o", "{out}"], "X.npy is not a Zarr store; convert it first"),
        (["fit", "{X}", "-k", "2", "-o", "{out}", "--component", "X"], "has no component"),
        (["transform", "{npy}", "{X}", "-o", "{out}"], "X.npy is not a Zarr store"),
        (["plot", "{X}", "-o", "{tmp}/p.png"], "is not a dasknmf model"),
        (["convert", "{tmp}/a.csv", "{out}"], "does not exist"),
        (["info", "{npy}"], "is not a Zarr store"),
    ],
)
def test_bad_input_exits_2_with_one_line(stored, tmp_path, args, message):
    folder, _ = stored
    (tmp_path / "existing.zarr").mkdir()
    names = dict(X=folder / "X.zarr", npy=folder / "X.npy", tmp=tmp_path,
                 out=tmp_path / "out.zarr", existing=tmp_path / "existing.zarr")  # fmt: skip
    result = run_cli(*(a.format(**names) for a in args), "-q")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sum(line.startswith("Error:") for line in result.stderr.splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists()


def test_other_failures_exit_1(stored, tmp_path):
    """No scheduler at the address: not bad input, a failure of the run."""
    folder, _ = stored
    env = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s")
    result = run_cli("fit", str(folder / "X.zarr"), "-k", "2", "-o", str(tmp_path / "m.zarr"),
                  "--scheduler-address", "tcp://127.0.0.1:9", "-q", env=env)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "m.zarr").exists()


def test_killed_fit_resumes_bit_identically(tmp_path):
    """SIGKILL to the whole job (driver, scheduler and workers) while it runs; --resume then
    gives exactly the factors of a run that was never interrupted, and the killed run left no
    model behind."""
    X = low_rank(20_000, 200, 10).astype(np.float32)
    source = dasknmf.save_matrix(tmp_path / "X.zarr", X, chunks=(2500, 200))
    settings = ["-k", "10", "--init", "random", "--random-state", "0", "--tol", "0",
                "--max-iter", "80", "--workers", "2", "-q"]  # fmt: skip
    reference = tmp_path / "reference.zarr"
    assert run_cli("fit", str(source), "-o", str(reference), *settings).returncode == 0

    model, checkpoint = tmp_path / "model.zarr", tmp_path / "ckpt"
    args = ["fit", str(source), "-o", str(model), *settings, "--checkpoint", str(checkpoint),
            "--checkpoint-every", "2"]  # fmt: skip
    job = subprocess.Popen(
        [sys.executable, "-m", "dasknmf", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (checkpoint / "iter-00000004").exists():
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not model.exists()
    # The newest generation: a kill between the rename of a new one and the removal of the
    # old one leaves both.
    newest = sorted(checkpoint.glob("iter-*/state.json"))[-1]
    stopped_at = json.loads(newest.read_text())["n_iter"]
    assert 4 <= stopped_at < 80

    resumed = last_json(run_cli(*args, "--resume", "--json"))
    assert resumed["n_iter"] == 80
    a, b = dasknmf.load(reference), dasknmf.load(model)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.W_.compute(), b.W_.compute())
    assert a.loss_history_ == b.loss_history_


def test_resume_refuses_a_checkpoint_of_other_settings(stored, tmp_path):
    folder, _ = stored
    common = ["fit", str(folder / "X.zarr"), "-o", str(tmp_path / "m.zarr"), "--workers", "1",
              "--init", "random", "--random-state", "0", "--tol", "0", "-q"]  # fmt: skip
    first = run_cli(*common, "-k", "4", "--max-iter", "4", "--checkpoint-every", "2")
    assert first.returncode == 0, first.stderr
    other = run_cli(*common, "-k", "3", "--max-iter", "8", "--resume", "--overwrite")
    assert other.returncode == 2
    assert "written for other settings" in other.stderr
    assert "settings.n_components: checkpoint 4, now 3" in other.stderr
    same = last_json(run_cli(*common, "-k", "4", "--max-iter", "8", "--resume", "--overwrite",
                           "--json"))  # fmt: skip
    assert same["n_iter"] == 8


def test_defaults_come_from_dask_config_and_the_environment():
    code = "import dask, dasknmf; print(dask.config.get('dasknmf.panel-bytes'))"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.stdout.strip() == "64MiB"
    env = dict(os.environ, DASK_DASKNMF__PANEL_BYTES="8MiB")
    set_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert set_.stdout.strip() == "8MiB"


def test_a_cluster_without_workers_fails_after_wait_for_workers(stored, tmp_path):
    """A batch spec with n_workers: 0, or a queue that never starts the jobs: exit 1 instead
    of waiting forever."""
    from distributed import LocalCluster

    folder, _ = stored
    with LocalCluster(n_workers=0, dashboard_address=None) as empty:
        result = run_cli("fit", str(folder / "X.zarr"), "-k", "2", "-o", str(tmp_path / "m.zarr"),
                      "--scheduler-address", empty.scheduler_address, "--wait-for-workers", "1",
                      "-q")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "No Dask worker joined" in result.stderr and "within 1 s" in result.stderr
    assert not (tmp_path / "m.zarr").exists()
