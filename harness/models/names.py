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
import os
import sys
import tempfile
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
        for path in sorted(folder.glob("*.json")):
            config = json.loads(path.read_text())
            if "preprocess_cfg" in config and all(key in config for key in CONFIG_KEYS):
                register_config(path.stem, config)


_PREPROCESS_CFGS: dict[str, dict[str, Any]] = {}  # by open_clip name: what register_config took out


def register_config(name: str, config: dict[str, Any]) -> None:
    """Register a model config with open_clip under ``name``, from a copy named by its content (processes that
    write it at once write the same bytes). open_clip's model classes take no ``preprocess_cfg`` (its model
    folders keep it beside the model config): the copy goes without, and ``model_config`` gives it back."""
    import open_clip

    if "preprocess_cfg" in config:
        config = dict(config)
        _PREPROCESS_CFGS[name] = config.pop("preprocess_cfg")
    text = json.dumps(config, sort_keys=True)
    folder = Path(tempfile.gettempdir()) / "clipkd-model-configs" / hashlib.sha256(text.encode()).hexdigest()[:16]
    copy = folder / f"{name}.json"  # open_clip names a config by its file's stem
    if not copy.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = copy.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(text)
        partial.replace(copy)
    open_clip.add_model_config(copy)


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
        if model in _PREPROCESS_CFGS:
            config["preprocess_cfg"] = copy.deepcopy(_PREPROCESS_CFGS[model])
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
PREPROCESS_DEFAULTS = {"mean": DEFAULT_MEAN, "std": DEFAULT_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
INTERPOLATIONS = ("bicubic", "bilinear")  # what open_clip's transforms resample with ('random' cannot be replayed)
RESIZE_MODES = ("shortest", "longest", "squash")
CLIP_CONTEXT_LENGTH = 77  # open_clip's DEFAULT_CONTEXT_LENGTH


def image_input(model: str, pretrained: str | None = None) -> dict[str, Any]:
    """A model's image input as ``open_clip.create_model_and_transforms(model, pretrained)`` gives it: its side,
    and open_clip's PreprocessCfg defaults, then the model config's ``preprocess_cfg`` (clipkd's configs may carry
    one, as open_clip's model folders do), then the pretrained tag's (SigLIP's tags set mean = std = 0.5 and
    ``squash``; its model configs say nothing). A tag's preprocessing is open_clip's table: read by importing
    open_clip, only for a tag. Values it cannot resample with are one message naming the model."""
    config = model_config(model)
    size = config["vision_cfg"]["image_size"]
    preprocess = {**PREPROCESS_DEFAULTS, "size": size if isinstance(size, int) else size[0]}
    preprocess.update({k: v for k, v in config.get("preprocess_cfg", {}).items() if k in PREPROCESS_DEFAULTS})
    if pretrained and not names_a_file(pretrained):
        preprocess.update({k: v for k, v in tag_preprocess(model, pretrained).items() if k in PREPROCESS_DEFAULTS})
    preprocess["mean"], preprocess["std"] = (_channels(model, preprocess[k], k) for k in ("mean", "std"))
    problems = []
    if preprocess["interpolation"] not in INTERPOLATIONS:
        problems.append(f"interpolation {preprocess['interpolation']!r} (accepted: {', '.join(INTERPOLATIONS)})")
    if preprocess["resize_mode"] not in RESIZE_MODES:
        problems.append(f"resize_mode {preprocess['resize_mode']!r} (accepted: {', '.join(RESIZE_MODES)})")
    if 0 in preprocess["std"]:
        problems.append("a std of 0")
    if problems:
        raise ModelLoadError(f"model {model!r}: its preprocessing cannot be built: {'; '.join(problems)}")
    return preprocess


def _channels(model: str, value, name: str) -> tuple[float, ...]:
    """A mean or std for three channels (open_clip also takes one number for all three)."""
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ModelLoadError(f"model {model!r}: preprocess_cfg {name} {value!r} is not three numbers (R, G, B)")
    return tuple(float(v) for v in values)


@functools.cache
def tag_preprocess(model: str, tag: str) -> dict[str, Any]:
    """The preprocessing open_clip's table gives a pretrained tag of a model ({} for a tag it does not know)."""
    import open_clip

    register_model_configs()
    return open_clip.get_pretrained_cfg(open_clip_name(model), tag) or {}


def text_input(model: str) -> dict[str, Any]:
    """What turns a caption into the model's tokens, as ``open_clip.get_tokenizer`` picks it: an HF tokenizer
    (``hf_tokenizer_name``), SigLIP's by the model's name, else CLIP's BPE (``tokenizer`` None); at the config's
    context length. Keys beyond these two only where a config sets them."""
    text = model_config(model).get("text_cfg", {})
    tokenizer = text.get("hf_tokenizer_name") or None
    name = open_clip_name(model).lower()  # the name open_clip's get_tokenizer reads
    if tokenizer is None and "siglip" in name:
        tokenizer = f"siglip:{'gemma' if 'siglip2' in name else 'mc4' if 'i18n' in name else 'c4-en'}"
    found = {"context_length": text.get("context_length", CLIP_CONTEXT_LENGTH), "tokenizer": tokenizer}
    found.update({key: text[key] for key in ("tokenizer_kwargs", "tokenizer_mode") if text.get(key)})
    return found


def has_logit_bias(model: str) -> bool:
    """Whether the model has a learned logit bias (open_clip's SigLIP configs: ``init_logit_bias``): a sigmoid
    model, trained by default with the sigmoid loss and distilled from as a sigmoid teacher."""
    return model_config(model).get("init_logit_bias") is not None


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
