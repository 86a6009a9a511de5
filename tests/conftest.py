import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip with a visible reason outside CI; in CI (CI=true) a missing component is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


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
def project(tmp_path: Path) -> Path:
    """A scratch copy of the project's configs, so runs land in tmp_path/runs."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory) -> tuple[Path, str]:
    """grids/smoke.yaml run once on the local executor (a teacher, then 8 students): its folder and the output
    of that first submission. Several test modules read its store."""
    workdir = tmp_path_factory.mktemp("smoke_grid")
    shutil.copytree(ROOT / "grids", workdir / "grids")
    shutil.copytree(ROOT / "configs", workdir / "configs")
    return workdir, run_clipkd("grid", "submit", "grids/smoke.yaml", "--executor", "local", cwd=workdir).stdout


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A teacher as a plain checkpoint file in open_clip's {"state_dict": ...} layout."""
    import torch

    from harness.models import create_clip

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(7)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, path)
    return path


def write_shards(folder: Path, sizes: list[int], prefix: str = "shard") -> str:
    """Digits training images as PNG webdataset shards of the given sizes; returns the brace pattern."""
    import io

    import webdataset as wds
    from PIL import Image

    from harness.data.builtin import load_builtin

    data = load_builtin("digits", "train")
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{prefix}-{shard:02d}.tar")) as sink:
            for i in range(start, start + size):
                png = io.BytesIO()
                Image.fromarray(data.images[i]).save(png, format="PNG")
                sink.write({"__key__": f"{i:05d}", "png": png.getvalue(), "txt": data.captions[i]})
        start += size
    return str(folder / f"{prefix}-{{00..{len(sizes) - 1:02d}}}.tar")
