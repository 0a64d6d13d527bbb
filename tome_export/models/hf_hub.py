"""Loading transformers ViT checkpoints: model names (``hf:<repo id>`` or a ``save_pretrained`` directory), the hub
or its cache, strict weight loading, and the image processor as tome-export's preprocessing.

transformers and huggingface_hub are imported only inside the functions that use them: they are optional.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import UserError
from .checkpoint import hub_reachable
from .hf_architectures import PROCESSORS, architecture_class

PREFIX = "hf:"
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# --- names -----------------------------------------------------------------------------------------------------


def is_path_name(name: str) -> bool:
    """Whether ``name`` is written as a path (aliases and timm/torchvision names never contain a separator)."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def resolve(name: str) -> Optional[str]:
    """The upstream name of an ``hf:<repo id>`` (the repo id) or a path (its absolute path); None if neither.

    A directory is checked here, before any slow work: it must hold a readable config of a supported architecture.
    """
    if name.startswith(PREFIX):
        repo = name[len(PREFIX):]
        _check_repo_id(repo)
        return repo
    if not is_path_name(name):
        return None
    directory = Path(name).expanduser()
    if not directory.is_dir():
        raise UserError(f"model directory {name!r} does not exist: pass a save_pretrained directory (config.json, "
                        "model.safetensors, preprocessor_config.json) or hf:<repo id>")
    read_config(directory)
    return str(directory.resolve())


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(f"{PREFIX}{repo!r} is not a Hugging Face repo id: use hf:<owner>/<name>, "
                        "e.g. hf:google/vit-base-patch16-224") from None


def read_config(directory: Path) -> Dict[str, Any]:
    """The ``config.json`` of a model directory, checked to be an architecture this family can merge."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{str(directory)!r} has no {CONFIG_FILE}: pass a directory written by save_pretrained "
                        "(config.json, model.safetensors, preprocessor_config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}): fix or re-save the model") from None
    if not isinstance(config, dict):
        raise UserError(f"{str(path)!r} is not a transformers config (a JSON object): re-save the model")
    architecture_class(config, str(directory))
    return config


def pair(value: Any) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


# --- loading ---------------------------------------------------------------------------------------------------


def quiet_transformers():
    """transformers, with its loading reports and progress bars off (this module reports problems itself)."""
    try:
        import transformers
    except ImportError:
        raise UserError("transformers models need the Python package 'transformers': "
                        "pip install 'tome-export[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _weight_file(directory: Path) -> Optional[Path]:
    return next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)


def hub_snapshot(repo: str, weights: bool) -> Path:
    """The local snapshot of a hub repo (config and image processor config, and weights if asked for).

    Downloads what is missing when the hub is reachable and ``HF_HUB_OFFLINE`` is not set; otherwise reads the cache
    only. Never falls back to anything else: a repo that cannot be had is a one-line error.
    """
    from huggingface_hub import snapshot_download

    offline = not hub_reachable()
    wanted = [[CONFIG_FILE, PROCESSOR_FILE]]
    if weights:  # safetensors first; .bin only for repos that have no safetensors
        wanted = [[CONFIG_FILE, PROCESSOR_FILE, "model.safetensors", "model.safetensors.index.json",
                   "model-*.safetensors"], ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]]
    try:
        directory = Path(snapshot_download(repo, allow_patterns=wanted[0], local_files_only=offline))
        if weights and _weight_file(directory) is None:
            directory = Path(snapshot_download(repo, allow_patterns=wanted[1], local_files_only=offline))
    except Exception as exc:  # every hub failure (offline, not cached, no such repo, gated) is the same user problem
        raise UserError(_hub_error(repo, type(exc).__name__, offline, weights)) from None
    if not (directory / CONFIG_FILE).is_file() or (weights and _weight_file(directory) is None):
        raise UserError(_hub_error(repo, "incomplete snapshot", offline, weights))
    return directory


def _hub_error(repo: str, what: str, offline: bool, weights: bool) -> str:
    import huggingface_hub.constants as hub

    where = f"the cache {hub.HF_HUB_CACHE} (offline)" if offline else "the Hugging Face hub"
    need = "pretrained weights" if weights else "the config"
    fix = ("pass a local save_pretrained directory as --model, or --weights random for seeded random weights "
           "(its config must be cached)" if weights else "pass a local save_pretrained directory as --model")
    return f"cannot load {need} of {PREFIX}{repo} from {where}: {what}. Offline and not cached? Run once online or {fix}"


def source_directory(name: str, weights: bool) -> Path:
    """The directory a resolved name loads from: a local directory, or the hub snapshot of a repo id."""
    return Path(name) if Path(name).is_absolute() else hub_snapshot(name, weights)


def build(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """The model of a resolved name (:func:`resolve`): random from its config (seed torch before) or pretrained.

    ``img_size`` sets the input resolution (position embeddings are interpolated as transformers does); other kwargs
    override config attributes (e.g. ``num_hidden_layers``, ``num_labels``). The model remembers its preprocessing
    (from ``preprocessor_config.json``, else the model type's image processor defaults) and where it came from.
    """
    transformers = quiet_transformers()
    directory = source_directory(name, pretrained)
    img_size = kwargs.pop("img_size", None)
    class_name, config = _model_config(transformers, directory, kwargs)
    cls = getattr(transformers, class_name)
    if pretrained:
        model = _load_pretrained(cls, directory, config)
    else:
        model = cls._from_config(config)
    model.tome_data_config = preprocessing(directory, config, img_size)
    model.tome_source = {"architecture": class_name, **_revision(directory),
                         "preprocessing_from": model.tome_data_config["source"]}
    if model.tome_data_config["guessed"]:
        where = f"{directory} has no {PROCESSOR_FILE}" if directory is not None else f"no {PROCESSOR_FILE}"
        model.tome_source["preprocessing_guessed"] = (f"{where}: the {model.tome_data_config['source']} at the "
                                                      f"config's image size were used; check they are what the "
                                                      f"model was trained with")
    return model.eval()


def _model_config(transformers, directory: Path, overrides: Dict[str, Any]):
    """(class name, config object) of a directory; a two-tower config yields its vision tower's config."""
    raw = read_config(directory)
    class_name = architecture_class(raw, str(directory))
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(f"transformers cannot read {str(directory / CONFIG_FILE)!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}): re-save the model") from None
    if raw.get("model_type") in ("clip", "siglip") and class_name in ("CLIPVisionModelWithProjection",
                                                                      "CLIPVisionModel", "SiglipVisionModel"):
        vision = config.vision_config
        if hasattr(config, "projection_dim"):  # the two-tower config holds the projection size
            vision.projection_dim = config.projection_dim
        config = vision
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"{type(config).__name__} has no attribute {key!r}: model arguments of a transformers "
                            "model are config attributes (e.g. num_hidden_layers, num_labels)")
        setattr(config, key, value)
    return class_name, config


def _load_pretrained(cls, directory: Path, config) -> torch.nn.Module:
    """Weights of a directory, strictly: a missing or mis-shaped tensor is an error, never a random init."""
    if _weight_file(directory) is None:
        raise UserError(f"{str(directory)!r} has no weights ({' or '.join(WEIGHT_FILES[::2])}): add them, or pass "
                        "--weights random for seeded random weights")
    try:
        model, info = cls.from_pretrained(str(directory), config=config, output_loading_info=True)
    except Exception as exc:
        raise UserError(f"cannot load the weights in {str(directory)!r} ({type(exc).__name__}): re-save the model "
                        "with save_pretrained") from None
    problems = {label: list(info.get(key) or []) for key, label in
                (("missing_keys", "missing"), ("mismatched_keys", "wrong shape"))}
    if any(problems.values()):
        parts = [f"{len(keys)} {label} ({', '.join(str(k) for k in keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in problems.items() if keys]
        raise UserError(f"the weights in {str(directory)!r} do not match its config ({cls.__name__}): "
                        f"{'; '.join(parts)}. Re-save the model with save_pretrained")
    return model


def _revision(directory: Path) -> Dict[str, str]:
    """The commit of a hub cache snapshot (``.../snapshots/<commit>``); nothing for other directories."""
    if directory.parent.name == "snapshots" and len(directory.name) == 40:
        return {"revision": directory.name}
    return {}


# --- preprocessing ---------------------------------------------------------------------------------------------


def preprocessing(directory: Optional[Path], config, img_size: Optional[int] = None) -> Dict[str, Any]:
    """The eval preprocessing of a model (timm-style data config) from its image processor.

    The processor is read from the directory's ``preprocessor_config.json``; without one, the model type's
    transformers processor with its defaults is used at the config's image size. ``img_size`` changes the input
    side and keeps the processor's resize-to-crop ratio.
    """
    transformers = quiet_transformers()
    path = directory / PROCESSOR_FILE if directory is not None else None
    if path is not None and path.is_file():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(directory))
        except Exception as exc:
            raise UserError(f"transformers cannot read {str(path)!r} ({type(exc).__name__}): fix or re-save the "
                            "image processor") from None
        where, guessed = str(path), False
    else:
        processor = getattr(transformers, PROCESSORS.get(config.model_type, "ViTImageProcessor"))()
        where, guessed = f"{type(processor).__name__} defaults", True
        img_size = img_size or pair(config.image_size)[0]
    # where the preprocessing came from: the build records it, and warns when it was guessed
    return {**processor_data_config(processor, where, img_size), "source": where, "guessed": guessed}


def _size_field(size: Any, key: str) -> Optional[int]:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def processor_data_config(processor: Any, where: str, img_size: Optional[int] = None) -> Dict[str, Any]:
    """A transformers image processor as a data config: input_size, mean, std, crop_pct, crop_mode, interpolation.

    Squash resizes (``size: {height, width}``) become ``crop_mode: squash``, shorter-edge resizes ``center``; the
    centre crop (if any) gives the input size. Rescaling and normalisation fold into mean and std.
    """
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if not getattr(processor, "do_resize", True) or size is None:
        raise UserError(f"{where} does not resize images: the input shape would depend on each image; "
                        "set do_resize and size")
    short = _size_field(size, "shortest_edge")
    if short:
        if crop is None:
            raise UserError(f"{where} resizes the shorter edge to {short} without a centre crop: the input shape "
                            "would depend on each image; set do_center_crop and crop_size")
        resize, mode = (short, short), "center"
    elif _size_field(size, "height") and _size_field(size, "width"):
        resize, mode = (_size_field(size, "height"), _size_field(size, "width")), "squash"
    else:
        raise UserError(f"{where} has a resize rule tome-export cannot represent ({size}): use size "
                        "{height, width} or {shortest_edge} with a centre crop")
    out = (_size_field(crop, "height"), _size_field(crop, "width")) if crop is not None else resize
    crop_pct = _crop_pct(out, resize, where)
    if img_size:
        out = (int(img_size), int(img_size))
    return {"input_size": (3, *out), "crop_pct": crop_pct, "crop_mode": mode,
            "interpolation": _interpolation(processor, where), **_normalization(processor)}


def _crop_pct(out: Tuple[int, int], resize: Tuple[int, int], where: str) -> float:
    """The crop fraction for which Preprocessing's ``floor(out / crop_pct)`` gives back ``resize`` on both sides."""
    for pct in (out[0] / resize[0], out[0] / (resize[0] + 0.5)):
        if all(math.floor(o / pct) == r for o, r in zip(out, resize)):
            return pct
    raise UserError(f"{where} crops {out[0]}x{out[1]} from {resize[0]}x{resize[1]}: tome-export needs the same "
                    "crop fraction on both sides")


def _interpolation(processor: Any, where: str) -> str:
    resample = getattr(processor, "resample", 2)
    try:
        return _RESAMPLE[int(getattr(resample, "value", resample))]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where} uses resample={resample!r}; tome-export supports PIL's nearest, bilinear, bicubic, "
                        "lanczos, box and hamming") from None


def _normalization(processor: Any) -> Dict[str, Tuple[float, ...]]:
    """mean/std applied to pixels scaled to [0, 1] that reproduce the processor's rescale and normalize steps."""
    scale = float(processor.rescale_factor) * 255 if getattr(processor, "do_rescale", True) else 255.0
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
        mean = mean if isinstance(mean, (list, tuple)) else [mean] * 3
        std = std if isinstance(std, (list, tuple)) else [std] * 3
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if abs(scale - 1.0) < 1e-9:  # the usual rescale by 1/255
        scale = 1.0
    # (p * rescale - mean) / std with p in [0, 255] equals (p / 255 - mean / s) / (std / s) with s = 255 * rescale
    return {"mean": tuple(float(m) / scale for m in mean), "std": tuple(float(s) / scale for s in std)}
