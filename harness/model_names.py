"""What names a model, without building one: the model configs clipkd knows, a config file's content hash, a
 Import-light (no torch, no open_clip: importing open_clip takes seconds), so validating a
config, planning a grid and reading its status stay quick; ``harness/models.py`` builds the models.

A model is an open_clip name, a config of ``harness/model_configs/`` or of a plugin package (entry-point group
``clipkd.model_configs``: a package or module whose folder holds open_clip model-config JSON files), or the path
of such a JSON file.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import ClipkdError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
MODEL_CONFIG_ENTRY_POINTS = "clipkd.model_configs"
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip asks of a model config
FINAL_CHECKPOINT = Path("checkpoints") / "final.pt"


class ModelLoadError(ClipkdError, RuntimeError):
    """A model or its weights could not be built; the message names the model and the file."""


@functools.cache
def model_config_folders() -> tuple[Path, ...]:
    """The folders of model configs clipkd adds to open_clip's own: the project's, and those plugin packages ship."""
    folders = [MODEL_CONFIG_DIR]
    for entry_point in importlib.metadata.entry_points(group=MODEL_CONFIG_ENTRY_POINTS):
        package = entry_point.dist.name if entry_point.dist else "an unknown package"
        try:
            folders.append(Path(entry_point.load().__file__).parent)
        except Exception as error:
            raise ModelLoadError(f"entry point {entry_point.name!r} = {entry_point.value!r} of {package} (group "
                                 f"{MODEL_CONFIG_ENTRY_POINTS}) is not an importable module with a folder of model "
                                 f"configs: {type(error).__name__}: {error}") from None
    return tuple(folders)


@functools.cache
def register_model_configs() -> None:
    """open_clip keeps added configs per process, so every process (and every job) registers them once, before
    it builds a model: the project's and those plugin packages ship."""
    import open_clip

    for folder in model_config_folders():
        open_clip.add_model_config(folder)


def known_model_names() -> list[str]:
    """The names ``open_clip.list_models()`` gives once clipkd's folders are added. Where open_clip is imported
    already, its list (a script may have added configs of its own: benchmarks/ does); else read from the config
    files as open_clip reads them (each JSON file of its own ``model_configs`` and of ours that has the config
    keys, by its stem), open_clip found and not imported (tests/test_train.py checks the two lists agree)."""
    if "open_clip" in sys.modules:
        register_model_configs()
        return sys.modules["open_clip"].list_models()
    return _names_in_config_files()


@functools.cache
def _names_in_config_files() -> list[str]:
    open_clip_folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    names = []
    for folder in (open_clip_folder, *model_config_folders()):
        for path in sorted(folder.glob("*.json")):
            config = json.loads(path.read_text())
            if all(key in config for key in CONFIG_KEYS):
                names.append(path.stem)
    return list(dict.fromkeys(names))


def is_config_file(model: str) -> bool:
    return model.endswith(".json")


def read_config_file(model: str) -> tuple[dict[str, Any], str]:
    """An open_clip model-config JSON file's content and the hash that names it; errors name the file."""
    path = Path(model)
    try:
        text = path.read_text()
        config = json.loads(text)
    except OSError as error:
        raise ModelLoadError(f"model config {model!r} cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model config {model!r} is not valid JSON: {error}") from None
    missing = [key for key in CONFIG_KEYS if key not in (config if isinstance(config, dict) else {})]
    if missing:
        raise ModelLoadError(f"model config {model!r} is not an open_clip model config: no {', '.join(missing)}")
    return config, hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def model_identity(model: str) -> str:
    """What a run id records of a model: its name, or a config file's content hash (a moved file is the same
    model, an edited one another)."""
    return f"json:{read_config_file(model)[1]}" if is_config_file(model) else model


def names_a_file(pretrained: str) -> bool:
    """Whether a ``pretrained`` value is a weights file's path rather than an open_clip tag."""
    return "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}
