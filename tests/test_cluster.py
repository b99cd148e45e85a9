"""Getting a Client: LocalCluster defaults, YAML specs (cluster_configs/), bad arguments."""

import pathlib

import pytest
import yaml

from dasknmf.cluster import connect, from_spec, load_spec, local_cluster

CONFIGS = pathlib.Path(__file__).parent.parent / "cluster_configs"
SPECS = sorted(CONFIGS.glob("*.yaml"))
# Packages a spec needs besides its module (distributed.deploy.ssh imports without asyncssh).
NEEDS = {"ssh.yaml": ["asyncssh"]}


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


def test_a_cluster_made_here_closes_without_heartbeat_tracebacks(monkeypatch, capfd):
    """A worker's heartbeat in flight while the scheduler removes it fails, and distributed
    logs a traceback on stderr (CI saw one after a CLI error). ``connect`` stops the heartbeats
    of a cluster it made before closing it. Heartbeats every 2 ms make the race certain:
    without the stop, each of these closes logged one."""
    import distributed.scheduler

    monkeypatch.setattr(distributed.scheduler, "heartbeat_interval", lambda n: 0.002)
    for _ in range(3):
        with connect(n_workers=2, heartbeat_interval="2ms", dashboard_address=None) as client:
            assert client.submit(sum, [1, 2]).result() == 3
    err = capfd.readouterr().err
    assert "heartbeat" not in err and "Traceback" not in err, err


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


def test_the_specs_are_there():
    assert {p.name for p in SPECS} >= {
        "local.yaml",
        "ssh.yaml",
        "slurm.yaml",
        "pbs.yaml",
        "kubernetes.yaml",
    }


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_loads_where_its_package_is_installed(path):
    text = path.read_text()
    assert text.startswith("# "), "each spec starts with a header saying what it is"
    spec = yaml.safe_load(text)
    assert spec["version"] == 1
    for module in [spec["module"], *NEEDS.get(path.name, [])]:
        pytest.importorskip(module)
    cluster_class, args, kwargs = load_spec(path)
    assert cluster_class.__name__ == spec["class"]
    assert (args, kwargs) == (spec["args"], spec["kwargs"])


# Where each spec asks for one thread per worker process (dasknmf's parallelism comes from tasks).
ONE_THREAD = {
    "local.yaml": lambda kw: kw["threads_per_worker"] == 1,
    "ssh.yaml": lambda kw: kw["worker_options"]["nthreads"] == 1,
    "slurm.yaml": lambda kw: kw["cores"] == kw["processes"],
    "pbs.yaml": lambda kw: kw["cores"] == kw["processes"],
    "kubernetes.yaml": lambda kw: "--nthreads 1" in kw["worker_command"],
}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_runs_one_thread_per_worker(path):
    assert ONE_THREAD[path.name](yaml.safe_load(path.read_text())["kwargs"])


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "slurm.yaml",
            [
                "#SBATCH -J dasknmf-worker",
                "#SBATCH -p normal",
                "#SBATCH -A my-project",
                "#SBATCH --cpus-per-task=8",
                "#SBATCH --mem=64G",
                "#SBATCH -t 04:00:00",
                "#SBATCH --hint=nomultithread",
            ],
        ),
        (
            "pbs.yaml",
            [
                "#PBS -N dasknmf-worker",
                "#PBS -q workq",
                "#PBS -A my-project",
                "#PBS -l select=1:ncpus=8:mem=64GB",
                "#PBS -l walltime=04:00:00",
                "#PBS -j oe",
            ],
        ),
    ],
)
def test_jobqueue_specs_write_the_job_script(name, expected):
    pytest.importorskip("dask_jobqueue")
    with from_spec(CONFIGS / name) as cluster:
        script = cluster.job_script()
        assert not cluster.workers, "n_workers: 0 submits no job"
    lines = script.splitlines()
    for directive in expected:
        assert directive in lines
    (command,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    for flags in (
        "--nthreads 1",
        "--memory-limit 8.00GiB",
        "--nworkers 8",
        "--local-directory ${TMPDIR:-/tmp}",
    ):
        assert flags in command


def test_ssh_spec_is_checked_without_connecting():
    pytest.importorskip("asyncssh")
    _, _, kwargs = load_spec(CONFIGS / "ssh.yaml")
    assert len(kwargs["hosts"]) >= 2  # a scheduler and at least one worker host


def test_kubernetes_spec():
    pytest.importorskip("dask_kubernetes.operator")
    _, args, kwargs = load_spec(CONFIGS / "kubernetes.yaml")
    assert args == []
    assert kwargs["resources"]["limits"]["cpu"] == "1"


def _spec(tmp_path, module, name, **kwargs):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"module": module, "class": name, "kwargs": kwargs}))
    return path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_workers": 1, "memory_limit": "1GiB"},  # LocalCluster's own and a Nanny's keyword
        {"lifetime": "1h", "nthreads": 1},  # passed on by the Nanny to its Worker
        {"processes": False, "lifetime": "1h"},  # straight to a Worker
    ],
)
def test_keywords_passed_on_to_workers_are_accepted(tmp_path, kwargs):
    load_spec(_spec(tmp_path, "distributed", "LocalCluster", **kwargs))


def test_an_unknown_keyword_is_named(tmp_path):
    path = _spec(tmp_path, "distributed", "LocalCluster", n_wrkers=2)
    with pytest.raises(ValueError, match="n_wrkers") as error:
        from_spec(path)
    assert str(path) in str(error.value)
    assert "did you mean 'n_workers'" in str(error.value)
    with pytest.raises(ValueError, match="takes no keyword 'env'"):  # a Nanny's, not a Worker's
        load_spec(_spec(tmp_path, "distributed", "LocalCluster", processes=False, env={}))
    path.write_text("module: distributed\nclass: LocalCluster\nargs: " + str([0] * 40))
    with pytest.raises(ValueError, match="does not take these arguments: too many positional"):
        load_spec(path)


@pytest.mark.parametrize(
    "module, name, kwargs, typo",
    [
        (
            "dask_jobqueue",
            "SLURMCluster",
            {"cores": 1, "memory": "1GiB", "walltme": "1:00"},
            "walltme",
        ),
        ("dask_jobqueue", "PBSCluster", {"cores": 1, "memory": "1GiB", "qeue": "q"}, "qeue"),
        (
            "distributed.deploy.ssh",
            "SSHCluster",
            {"hosts": ["a", "b"], "worker_option": {}},
            "worker_option",
        ),
    ],
)
def test_typos_are_caught_behind_kwargs(tmp_path, module, name, kwargs, typo):
    pytest.importorskip(module)
    with pytest.raises(ValueError, match=f"{name} takes no keyword '{typo}'"):
        load_spec(_spec(tmp_path, module, name, **kwargs))


@pytest.mark.timeout(180)
def test_workers_with_another_dasknmf_are_refused_before_any_task(tmp_path):
    """A worker that imports another copy of dasknmf (here this one with a file changed, put
    first on the workers' path) failed the first task it was sent in its connection to the
    scheduler and left; the fit then waited for ever. Now the fit is refused at once, naming
    the worker and both versions; a worker without dasknmf's ``code_digest`` (an older
    dasknmf, or none) is refused as well."""
    import shutil

    import dask.array as da
    from distributed import Client, LocalCluster

    import dasknmf
    from dasknmf import NMF
    from dasknmf._workers_code import WorkerCodeError, code_digest
    from tests.conftest import low_rank

    other = tmp_path / "other"
    source = pathlib.Path(dasknmf.__file__).parent
    shutil.copytree(source, other / "dasknmf", ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "dasknmf" / "kernels.py", "a") as file:
        file.write("\n# another dasknmf\n")
    preload = tmp_path / "other_dasknmf_first.py"
    preload.write_text(f"import sys\nsys.path.insert(0, {str(other)!r})\n")
    X = da.from_array(low_rank(40, 10, 2), chunks=(20, 10))
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address=None, preload=[str(preload)]
        ) as cluster,
        Client(cluster) as client,
    ):
        theirs = client.run(code_digest)
        assert list(theirs.values()) != [code_digest()]  # the workers' copy is the other one
        with pytest.raises(WorkerCodeError, match="Workers run another dasknmf") as error:
            NMF(2, init="random", random_state=0, max_iter=2).fit(X)
        assert code_digest() in str(error.value) and next(iter(theirs)) in str(error.value)
        # A copy without ``code_digest`` (as every dasknmf before it): refused too.
        ops_py = other / "dasknmf" / "_workers_code.py"
        ops_py.write_text(ops_py.read_text().replace("def code_digest", "def _old_digest"))
        client.restart()
        with pytest.raises(WorkerCodeError, match="Workers cannot import this process's dasknmf"):
            NMF(2, init="random", random_state=0, max_iter=2).fit(X)
