#!/usr/bin/env bash
# Wheels for a GPU machine that has its own python3 and torch but reaches no package registry (the device machine
# of ../shared/DESIGN.md §7: Python 3.12, torch 2.11, torchvision, timm, pandas, PyYAML, scipy, tensorboard).
# Downloads the rest of what clipkd imports, at the versions this checkout's .venv resolved, as cp312 wheels, into
# build/gpu-wheels (ignored by git; carry it to the machine). benchmarks/README.md has the command that installs
# them there and runs benchmarks/gpu_check.py.
#
#   bash scripts/gpu_wheels.sh [OUT] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu-wheels}
python_version=${2:-3.12}
venv_python=.venv/bin/python
[ -x "$venv_python" ] || { echo "gpu_wheels: run 'make install' first (the versions come from .venv)" >&2; exit 2; }
# What the GPU machine lacks: clipkd's own dependencies and theirs, torch, timm and their stack excepted.
names=(open_clip_torch clip_benchmark submitit cloudpickle SQLAlchemy alembic Mako MarkupSafe pydantic pydantic_core
       annotated-types typing-inspection typing_extensions webdataset braceexpand ftfy wcwidth regex scikit-learn
       joblib threadpoolctl tabulate)
pins=()
for name in "${names[@]}"; do
    pins+=("$name==$("$venv_python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
mkdir -p "$out"
"$venv_python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$out" "${pins[@]}"
echo "gpu_wheels: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), in $out for Python $python_version"
