import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"

# Each xdist worker, and every process it starts, gets its share of the cores as OpenMP threads (set before torch
# loads): with torch's default of a thread per core, two workers on two cores run four spinning threads, and
# compute-bound tests take half as long again (test_train's slowest four: 169 s, 109 s at one thread each).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(max(1, len(os.sched_getaffinity(0)) // workers)))


def require(condition: bool, reason: str) -> None:
    """Skip with a visible reason outside CI; in CI (CI=true) a missing component is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A grouped test fails when ``--dist loadgroup`` has stopped grouping. xdist groups by suffixing each marked
    test's node id with ``@group`` during the worker's collection; pytest 9.2 ignores that write
    (pytest-xdist#1386), and the groups then spread over both workers without a word: the smoke grid trained
    twice, the two-node SLURM test stopping the cluster under another SLURM test."""
    grouping = os.environ.get("PYTEST_XDIST_WORKER") and item.config.getvalue("loadgroup")
    if grouping and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail("--dist loadgroup did not put this test in its xdist_group: this pytest is not one "
                    "pytest-xdist can group with (pyproject.toml pins the range)", pytrace=False)


@contextlib.contextmanager
def rendezvous():
    """Where a group of test processes meets: a store this process serves on a port the OS picks, held open for
    the group's life (a port found free, closed and handed on can be taken in between). The processes join as its
    clients, as ranks do under torchrun, with the variables it yields."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def free_port() -> int:
    """A port free now, for a server that must be told its port (Streamlit, a site's preset MASTER_PORT)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_clipkd(*args: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"clipkd {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def clipkd(monkeypatch, capsys):
    """The command line's main() in this process, for tests of what it answers to bad input: the same parsing,
    checks, messages and exit code as ``run_clipkd`` without the seconds a new process spends importing torch and
    open_clip (run_clipkd covers the process itself)."""
    from harness.cli import main

    def invoke(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's own usage errors
            code = exit.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["clipkd", *args], code, out.out, out.err)

    return invoke


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of the project's configs, so runs land in tmp_path/runs."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


REFERENCE_WEIGHTS = "published-tiny-teacher.pt"  # a "public" model the smoke store records beside its runs


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory) -> tuple[Path, str]:
    """grids/smoke.yaml run once on the local executor (a teacher, then 8 students), then a reference model
    recorded beside them (`clipkd eval --record`, offline, from a weights file): its folder and the output of
    the grid's first submission. Several test modules read its store."""
    import torch

    from harness.models.build import create_clip

    workdir = tmp_path_factory.mktemp("smoke_grid")
    shutil.copytree(ROOT / "grids", workdir / "grids")
    shutil.copytree(ROOT / "configs", workdir / "configs")
    out = run_clipkd("grid", "submit", "grids/smoke.yaml", "--executor", "local", cwd=workdir).stdout
    torch.manual_seed(11)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, workdir / REFERENCE_WEIGHTS)
    run_clipkd("eval", "--model", "clipkd-tiny-teacher", "--pretrained", REFERENCE_WEIGHTS, "--dataset", "digits",
               "--workers", "0", "--record", cwd=workdir)
    return workdir, out


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A teacher as a plain checkpoint file in open_clip's {"state_dict": ...} layout."""
    import torch

    from harness.models.build import create_clip

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(7)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, path)
    return path


def write_shards(folder: Path, sizes: list[int], prefix: str = "shard", offset: int = 0, synthetic: int = 0) -> str:
    """Digits training images as PNG webdataset shards of the given sizes, keyed from 0, the images from the
    ``offset``-th on, each with ``synthetic`` more captions in a DataCompDR ``syn.json``; returns the brace
    pattern."""
    import io
    import json

    import webdataset as wds
    from PIL import Image

    from core.builtin import load_builtin

    data = load_builtin("digits", "train")
    folder.mkdir(parents=True, exist_ok=True)
    start, digits = 0, max(2, len(str(len(sizes) - 1)))
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{prefix}-{shard:0{digits}d}.tar")) as sink:
            for i in range(start, start + size):
                png = io.BytesIO()
                Image.fromarray(data.images[i + offset]).save(png, format="PNG")
                sample = {"__key__": f"{i:05d}", "png": png.getvalue(), "txt": data.captions[i + offset]}
                if synthetic:
                    words = data.captions[i + offset].split()
                    texts = [" ".join(["a photo of", *words[k + 1:], *words[1:k + 1]]) for k in range(synthetic)]
                    sample["syn.json"] = json.dumps({"syn_text": texts}).encode()
                sink.write(sample)
        start += size
    return str(folder / f"{prefix}-{{{0:0{digits}d}..{len(sizes) - 1:0{digits}d}}}.tar")


def resumed_equals_straight(resolved: dict, folder: Path, monkeypatch, step: int = 3) -> tuple[Path, Path]:
    """The run of ``resolved`` (a config's ``resolved()``) trained straight, and again stopped by SIGUSR1 once step
    ``step`` is done (as scancel's signal would arrive: it checkpoints and raises TrainingInterrupted) and resumed;
    asserts their final weights are equal, bit for bit. Returns the two run folders."""
    import os
    import signal

    import torch

    from harness.config.run_config import parse_config
    from harness.training.loop import Trainer, train
    from harness.training.stops import TrainingInterrupted

    straight = train(parse_config({**resolved, "output_dir": str(folder / "straight")}))
    stopped = parse_config({**resolved, "output_dir": str(folder / "stopped")})
    real = Trainer.train_step

    def signalled(self, batch):
        result = real(self, batch)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(Trainer, "train_step", signalled)
    with pytest.raises(TrainingInterrupted):
        train(stopped)
    monkeypatch.undo()
    resumed = train(stopped, resume=True)
    a, b = (torch.load(d / "checkpoints" / "final.pt", weights_only=False)["state_dict"] for d in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    return straight, resumed


POSTGRES = ROOT / "scripts" / "postgres.sh"


def _postgres_up() -> bool:
    return subprocess.run(["bash", str(POSTGRES), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of the test PostgreSQL server's maintenance database (scripts/postgres.sh, which .ci/run starts)."""
    if not _postgres_up() and os.geteuid() == 0 and list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        subprocess.run(["bash", str(POSTGRES), "start"], capture_output=True, timeout=180)
    require(_postgres_up(), "no PostgreSQL server is running: `sudo scripts/postgres.sh install && sudo "
                            "scripts/postgres.sh start` (needs root)")
    return subprocess.run(["bash", str(POSTGRES), "url"], capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def postgres_database(server_url: str):
    """A database of its own on the test PostgreSQL server, dropped afterwards; yields its URL."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(server_url)
    name = f"clipkd_test_{uuid.uuid4().hex[:12]}"
    maintenance = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(maintenance, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A new, empty results store: a SQLite file, or a database of its own on the real PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture
def postgres_store(postgres_server):
    """A new, empty store on the real PostgreSQL server."""
    with postgres_database(postgres_server) as url:
        yield url
