"""What names a model, without building one: the model configs clipkd knows, a config file's content hash.
Import-light (no torch, no open_clip: importing open_clip takes seconds), so validating a
config, planning a grid and reading its status stay quick; ``harness/models/build.py`` builds the models.

A model is an open_clip name, a config of ``harness/models/configs/`` or of a plugin package (entry-point group
``clipkd.model_configs``: a package or module whose folder holds open_clip model-config JSON files), or the path
of such a JSON file.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import ClipkdError

MODEL_CONFIG_DIR = Path(__file__).parent / "configs"
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
    return list(_configs_in_files())


@functools.cache
def _configs_in_files() -> dict[str, dict[str, Any]]:
    """Every model config by name as open_clip registers them: its own folder's, then ours over them."""
    open_clip_folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    configs = {}
    for folder in (open_clip_folder, *model_config_folders()):
        for path in sorted(folder.glob("*.json")):
            config = json.loads(path.read_text())
            if all(key in config for key in CONFIG_KEYS):
                configs[path.stem] = config
    return configs


def model_config(model: str) -> dict[str, Any]:
    """``open_clip.get_model_config`` of a model name or config file, read as ``known_model_names`` reads the
    names: from open_clip where it is imported, else from the files (a cache key is computed without open_clip's
    seconds of imports; tests/test_train.py checks the two agree)."""
    if is_config_file(model):
        return read_config_file(model)[0]
    if "open_clip" in sys.modules:
        register_model_configs()
        config = sys.modules["open_clip"].get_model_config(model)
    else:
        config = copy.deepcopy(_configs_in_files().get(model))
    if config is None:
        raise ModelLoadError(f"unknown model {model!r}: neither an open_clip model, a config of clipkd's or a plugin's, "
                             "nor a model-config JSON file")
    return config


# open_clip's PreprocessCfg defaults (OpenAI's CLIP normalisation), for a config without ``preprocess_cfg``:
# written here so that reading a model's input needs no import of open_clip (tests/test_train.py compares them)
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def image_input(model: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """A model's image side and normalisation (mean, std), as open_clip's preprocess config gives them."""
    config = model_config(model)
    preprocess = config.get("preprocess_cfg", {})
    size = config["vision_cfg"]["image_size"]
    return (size if isinstance(size, int) else size[0], tuple(preprocess.get("mean", DEFAULT_MEAN)),
            tuple(preprocess.get("std", DEFAULT_STD)))


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


def open_clip_name(model: str) -> str:
    """The name open_clip knows a model by: its own, or a config file's stem and content hash (the name
    ``build.model_name`` registers the file under)."""
    return f"{Path(model).stem}-{read_config_file(model)[1]}" if is_config_file(model) else model


def model_identity(model: str) -> str:
    """What a run id records of a model: its name, or a config file's content hash (a moved file is the same
    model, an edited one another)."""
    return f"json:{read_config_file(model)[1]}" if is_config_file(model) else model


def names_a_file(pretrained: str) -> bool:
    """Whether a ``pretrained`` value is a weights file's path rather than an open_clip tag."""
    return "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}
