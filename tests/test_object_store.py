"""Stores in an object store: an S3-compatible server on loopback (moto's server mode, as
s3fs's own tests use), reached through zarr's fsspec store.

convert → fit on a LocalCluster (out of core: X re-read from S3 every iteration) → save →
load → transform equals the same steps on local disk, bit for bit; checkpoints and resume on
S3; the command line configured by environment variables; bad URLs, buckets and credentials.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from conftest import last_json, low_rank, run_cli

pytest.importorskip("s3fs", reason="pip install 's3fs' 'moto[server]' (the test extra has them)")
moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")

from dasknmf import NMF, convert, load, open_matrix, save_matrix  # noqa: E402
from dasknmf.storage import MatrixPathError, StorageError  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with a bucket 'bucket'; yields its storage_options."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("bucket")
    try:
        yield options
    finally:
        server.stop()


def _listing(s3, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    return sorted(fs.find(prefix))


PARAMS = {"n_components": 4, "random_state": 0, "max_iter": 20, "tol": 0, "cache": False}


def test_convert_fit_save_load_transform_equal_local_disk(tmp_path, s3, cluster):
    X = low_rank(900, 50, 4, seed=1, dtype=np.float32)
    np.save(tmp_path / "X.npy", X)
    local, remote = tmp_path / "X.zarr", "s3://bucket/run/X.zarr"
    convert(tmp_path / "X.npy", local)
    assert convert(tmp_path / "X.npy", remote, storage_options=s3) == remote
    panels = {"panel_bytes": 20_000}  # 7 panels, read from S3 in every iteration
    on_disk = NMF(**PARAMS, **panels).fit(str(local))
    on_s3 = NMF(**PARAMS, **panels, storage_options=s3).fit(remote)
    np.testing.assert_array_equal(on_s3.components_, on_disk.components_)
    np.testing.assert_array_equal(on_s3.W_.compute(), on_disk.W_.compute())
    assert on_s3.reconstruction_err_ == on_disk.reconstruction_err_

    on_disk.save(tmp_path / "model.zarr")
    on_s3.save("s3://bucket/run/model.zarr")  # the model's storage_options
    assert not [k for k in _listing(s3, "bucket/run") if ".tmp-" in k]
    from_disk = load(tmp_path / "model.zarr")
    from_s3 = load("s3://bucket/run/model.zarr", storage_options=s3)
    np.testing.assert_array_equal(from_s3.components_, from_disk.components_)
    np.testing.assert_array_equal(from_s3.W_.compute(), from_disk.W_.compute())
    W_disk = from_disk.transform(str(local)).compute()
    W_s3 = from_s3.transform(remote).compute()
    np.testing.assert_array_equal(W_s3, W_disk)


# 69 s on 2 cores: out of the default run to keep CI under 15 minutes; checkpoints and sparse
# stores are tested on disk, S3 by the test above and the CLI's (run it with -m slow).
@pytest.mark.slow
def test_sparse_store_and_checkpoint_resume_on_s3(tmp_path, s3, cluster):
    import scipy.sparse as sp

    S = sp.random(600, 80, density=0.1, format="csr", random_state=2, dtype=np.float32)
    save_matrix("s3://bucket/sparse/S.zarr", S, storage_options=s3)
    X = open_matrix("s3://bucket/sparse/S.zarr", storage_options=s3, panel_bytes=12000)
    assert len(X.chunks[0]) > 2
    params = {**PARAMS, "panel_bytes": 12000, "storage_options": s3}
    ckpt = "s3://bucket/sparse/ckpt"
    whole = NMF(**params).fit(X)
    first = NMF(**{**params, "max_iter": 12}, checkpoint=ckpt, checkpoint_every=5).fit(X)
    assert first.n_iter_ == 12
    generations = {k.split("/")[3] for k in _listing(s3, "bucket/sparse/ckpt")}
    assert generations == {"iter-00000010"}
    resumed = NMF(**params, checkpoint=ckpt, checkpoint_every=5, resume=True).fit(X)
    np.testing.assert_array_equal(resumed.components_, whole.components_)
    np.testing.assert_array_equal(resumed.W_.compute(), whole.W_.compute())


# ---- the command line, configured as fsspec and botocore are: by the environment -------------


@pytest.fixture
def s3_env(s3):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **env,
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": s3["endpoint_url"],
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_command_line_pipeline_on_s3(tmp_path, s3, s3_env):
    X = low_rank(500, 30, 3, seed=4, dtype=np.float32)
    np.save(tmp_path / "X.npy", X)
    base = "s3://bucket/cli"
    steps = [
        ["convert", str(tmp_path / "X.npy"), f"{base}/X.zarr"],
        ["fit", f"{base}/X.zarr", "-k", "3", "-o", f"{base}/model.zarr", "--random-state", "0",
         "--max-iter", "12", "--tol", "0", "--checkpoint-every", "5", "--workers", "2"],
        ["info", f"{base}/model.zarr"],
        ["transform", f"{base}/model.zarr", f"{base}/X.zarr", "-o", f"{base}/W.zarr",
         "--workers", "2"],
        ["plot", f"{base}/model.zarr", "-o", f"{base}/loss.png"],
    ]  # fmt: skip
    records = []
    for step in steps:
        records.append(last_json(run_cli(*step, "--json", "--quiet", env=s3_env)))
    assert records[1]["n_iter"] == 12 and records[2]["n_iter"] == 12
    assert records[3]["shape"] == [500, 3]
    keys = _listing(s3, "bucket/cli")
    assert "bucket/cli/loss.png" in keys and "bucket/cli/W.zarr/zarr.json" in keys
    assert any(k.startswith("bucket/cli/model.zarr.checkpoint/iter-00000010/") for k in keys)
    reference = NMF(3, random_state=0, max_iter=12, tol=0).fit(X)
    model = load(f"{base}/model.zarr", storage_options=s3)
    np.testing.assert_allclose(model.components_, reference.components_, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "foo://bucket/X.zarr", "-k", "2", "-o", "OUT"], "Unknown URL scheme 'foo://'"),
        (["fit", "s3://no-such-bucket/X.zarr", "-k", "2", "-o", "OUT"], "does not exist"),
        (["info", "s3://bucket/missing.zarr"], "No such matrix: s3://bucket/missing.zarr"),
        (
            ["fit", "s3://bucket/bad/X.zarr", "-k", "2", "-o", "s3://no-such-bucket/m.zarr"],
            "its bucket no-such-bucket does not exist",
        ),
    ],
)
def test_bad_urls_exit_2_with_one_line(tmp_path, s3, s3_env, args, message):
    save_matrix("s3://bucket/bad/X.zarr", np.ones((10, 4)), storage_options=s3, overwrite=True)
    args = [a.replace("OUT", str(tmp_path / "m.zarr")) for a in args]
    result = run_cli(*args, env=s3_env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
    assert not [k for k in _listing(s3, "bucket") if "m.zarr" in k]


def test_missing_credentials_exit_2(tmp_path, s3, s3_env):
    env = {k: v for k, v in s3_env.items() if k not in CREDENTIALS}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    save_matrix("s3://bucket/creds/X.zarr", np.ones((10, 4)), storage_options=s3, overwrite=True)
    result = run_cli("info", "s3://bucket/creds/X.zarr", env=env)
    assert result.returncode == 2, result.stderr
    assert "credentials" in result.stderr and "s3://bucket/creds/X.zarr" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_locations_from_python(s3, tmp_path):
    with pytest.raises(StorageError, match="Unknown URL scheme 'nope://'"):
        open_matrix("nope://x/y.zarr")
    with pytest.raises(MatrixPathError, match="s3://no-such-bucket/X.zarr does not exist"):
        open_matrix("s3://no-such-bucket/X.zarr", storage_options=s3)
    with pytest.raises(MatrixPathError, match="its bucket no-such-bucket does not exist"):
        save_matrix("s3://no-such-bucket/X.zarr", np.ones((3, 3)), storage_options=s3)
    save_matrix("s3://bucket/twice.zarr", np.ones((3, 3)), storage_options=s3, overwrite=True)
    with pytest.raises(FileExistsError, match="s3://bucket/twice.zarr already exists"):
        save_matrix("s3://bucket/twice.zarr", np.ones((3, 3)), storage_options=s3)
    with pytest.raises(TypeError, match="storage_options"):
        NMF(2, storage_options="endpoint").fit(np.ones((4, 4)))
