"""Getting a Client: LocalCluster defaults, YAML specs (cluster_configs/), bad arguments."""

import pathlib

import pytest

from dasknmf.cluster import connect, from_spec, local_cluster

CONFIGS = pathlib.Path(__file__).parent.parent / "cluster_configs"


def test_local_yaml_builds_a_real_local_cluster():
    with connect(spec=CONFIGS / "local.yaml") as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers)
        assert client.submit(sum, [1, 2]).result() == 3


def test_local_cluster_divides_memory_among_workers():
    with local_cluster(n_workers=1, dashboard_address=None) as cluster:
        assert len(cluster.workers) == 1
    with pytest.raises(ValueError, match="n_workers must be at least 1"):
        local_cluster(n_workers=-1)


def test_connect_to_an_address_and_a_scheduler_file(tmp_path):
    from distributed import Client

    with local_cluster(n_workers=1, dashboard_address=None) as cluster:
        with connect(address=cluster.scheduler_address) as client:
            assert client.submit(len, "abc").result() == 3
        with Client(cluster) as first:
            first.write_scheduler_file(str(tmp_path / "scheduler.json"))
            with connect(scheduler_file=tmp_path / "scheduler.json") as client:
                assert client.submit(len, "ab").result() == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("module: distributed\n", "must be a mapping with 'module' and 'class'"),
        ("[1, 2", "is not valid YAML"),
        ("module: no_such_module_xyz\nclass: C\n", "cannot be imported"),
        ("module: distributed\nclass: NoSuchCluster\n", "has no class 'NoSuchCluster'"),
        ("module: distributed\nclass: LocalCluster\nargs: {a: 1}\n", "'args' must be a list"),
    ],
)
def test_bad_specs(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        from_spec(path)


def test_bad_connect_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_spec(tmp_path / "missing.yaml")
    with (
        pytest.raises(ValueError, match="Scheduler file .* does not exist"),
        connect(scheduler_file=tmp_path / "missing.json"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="Give one of address, scheduler_file and spec"),
        connect(address="tcp://1.2.3.4:8786", spec="x.yaml"),
    ):
        pass
