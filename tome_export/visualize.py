"""Pictures of what ToMe merged: every final token's group of patches in one colour, with its outline.

The pipeline is a chain of small pure functions on NumPy arrays::

    source map (T, T0) --source_labels--> label map (grid) --render--> picture (H, W, 3)

``source[t, j] = 1`` when input token ``j`` ended up in token ``t``. Source maps come from PyTorch
(:func:`torch_source_maps`, the patched model's source tracking, optionally cut after any block) or from a
built artifact whose graph has a ``source`` output (:func:`artifact_source_map`, ``--trace-source``), so
the picture shows what the deployed graph does. Groups are not necessarily connected: ToMe merges similar
tokens wherever they are, which is why every group gets its own colour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError, ValidationError
from .files import atomic_path
from .graph_names import SOURCE_NAME
from .images import SAMPLE_PHOTOS, sample_photo_paths
from .manifest import Manifest
from .preprocess import Preprocessing

if TYPE_CHECKING:
    from .runtime import Artifact

FILLS = ("mean", "palette")


# --- pure functions: source map -> labels -> picture ------------------------------------------------


def source_labels(source: np.ndarray, num_protected: int, grid: Tuple[int, int]) -> np.ndarray:
    """The group of every patch, ``(grid_h, grid_w)`` ints ``0..G-1`` (G = final tokens - protected).

    ``source`` ``(T, T0)`` is one image's source map. It must be a partition of the patches that leaves the
    protected tokens alone; anything else means the graph or model that produced it does not compute ToMe
    (ValueError).
    """
    src = np.asarray(source)
    gh, gw = grid
    p = num_protected
    if src.ndim != 2 or src.shape[1] != p + gh * gw or src.shape[0] <= p:
        raise ValueError(f"a source map of shape {src.shape} does not fit {p} protected tokens and a {gh}x{gw} grid")
    if not np.isin(src, (0, 1)).all():
        raise ValueError("the source map holds values other than 0 and 1")
    if not (np.array_equal(src[:p, :p], np.eye(p)) and not src[:p, p:].any() and not src[p:, :p].any()):
        raise ValueError("protected tokens were merged in the source map")
    patches = src[p:, p:]
    if not (patches.sum(axis=0) == 1).all():
        raise ValueError("the source map puts a patch in no token or in several")
    if not (patches.sum(axis=1) >= 1).all():
        raise ValueError("the source map has a token that holds no patch")
    return patches.argmax(axis=0).reshape(gh, gw)


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct bright colours ``(n, 3)`` uint8, the same for the same ``n`` and ``seed``."""
    rng = np.random.default_rng(seed)
    colours: List[Tuple[int, ...]] = []
    seen = set()
    while len(colours) < n:
        colour = tuple(int(v) for v in rng.integers(48, 256, size=3))  # never black: borders use black
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


def pixel_labels(labels: np.ndarray, image_hw: Tuple[int, int], patch: Tuple[int, int], scale: int = 1) -> np.ndarray:
    """The group of every pixel ``(H*scale, W*scale)``; -1 where the patch grid does not reach (H % patch)."""
    gh, gw = labels.shape
    out = np.full(image_hw, -1, dtype=np.int64)
    out[: gh * patch[0], : gw * patch[1]] = np.repeat(np.repeat(labels, patch[0], axis=0), patch[1], axis=1)
    return np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)


def border_mask(pix: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of a group within ``width`` of another group or of the picture's edge (each group's outline)."""
    h, w = pix.shape
    padded = np.pad(pix, width, constant_values=-2)
    mask = np.zeros(pix.shape, dtype=bool)
    for d in range(1, width + 1):
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            mask |= padded[width + dy: width + dy + h, width + dx: width + dx + w] != pix
    return mask & (pix >= 0)


def group_means(image: np.ndarray, pix: np.ndarray, num_groups: int) -> np.ndarray:
    """The mean colour of each group's pixels ``(G, 3)`` uint8."""
    inside = pix >= 0
    counts = np.bincount(pix[inside], minlength=num_groups).astype(np.float64)
    sums = np.stack([np.bincount(pix[inside], weights=image[..., c][inside].astype(np.float64), minlength=num_groups)
                     for c in range(3)], axis=1)
    return np.clip(np.rint(sums / np.maximum(counts, 1)[:, None]), 0, 255).astype(np.uint8)


def render(image: np.ndarray, labels: np.ndarray, patch: Tuple[int, int], fill: str = "mean", scale: int = 1,
           border: Optional[int] = None) -> np.ndarray:
    """The picture ``(H*scale, W*scale, 3)`` uint8: groups filled and outlined.

    ``fill="mean"`` (as in the ToMe paper's figures): each group in its mean colour, outlined in its own
    palette colour. ``fill="palette"``: each group in its palette colour, outlined in black. Pixels the patch
    grid does not reach keep the image.
    """
    if fill not in FILLS:
        raise UserError(f"unknown fill {fill!r}: choose {' or '.join(FILLS)}")
    image = np.asarray(image, dtype=np.uint8)
    num_groups = int(labels.max()) + 1
    colours = palette(num_groups)
    fills = group_means(image, pixel_labels(labels, image.shape[:2], patch), num_groups) if fill == "mean" else colours
    pix = pixel_labels(labels, image.shape[:2], patch, scale)
    out = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1).copy()
    inside = pix >= 0
    out[inside] = fills[pix[inside]]
    edges = border_mask(pix, border if border is not None else max(1, scale))
    out[edges] = colours[pix[edges]] if fill == "mean" else 0
    return out


def display_image(chw: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The picture the model sees ``(H, W, 3)`` uint8: a preprocessed ``(C, H, W)`` array, un-normalised."""
    rgb = chw.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def compose(panels: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4) -> Image.Image:
    """Panels side by side (``columns`` per row), each with its title underneath, on white."""
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    font = _font(max(12, w // 20))
    caption = max(18, w // 12)
    gap = 8
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * w + (cols + 1) * gap, rows * (h + caption) + (rows + 1) * gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = gap + (i % cols) * (w + gap)
        y = gap + (i // cols) * (h + caption + gap)
        sheet.paste(Image.fromarray(panel), (x, y))
        draw.text((x + 2, y + h + 2), title, fill="black", font=font)
    return sheet


# --- where source maps come from ----------------------------------------------------------------------


@dataclass(frozen=True)
class MergeState:
    """One image's merge state: the label map and what it was cut from."""

    title: str
    labels: np.ndarray  # (grid_h, grid_w): group of each patch
    num_tokens: int  # tokens at this point, protected included
    num_protected: int

    @property
    def num_groups(self) -> int:
        return self.num_tokens - self.num_protected


def find_image(text: Union[str, os.PathLike]) -> Path:
    """A path, or the name of a photo bundled with tome_export (astronaut, chelsea, coffee, ...)."""
    path = Path(text)
    if path.exists():
        return path
    bundled = {p.stem: p for p in sample_photo_paths()}
    if str(text) in bundled:
        return bundled[str(text)]
    names = ", ".join(Path(n).stem for n in SAMPLE_PHOTOS)
    raise UserError(f"image {str(text)!r} does not exist: pass an image file or a bundled photo ({names})")


def parse_blocks(text: str, num_blocks: int) -> List[int]:
    """``"1,6,12"`` -> ``[1, 6, 12]``: merge states after those blocks (0 = before any block)."""
    try:
        blocks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        blocks = []
    if not blocks:
        raise UserError(f"cannot read --blocks {text!r}: give block numbers separated by commas, e.g. 1,6,{num_blocks}")
    wrong = [b for b in blocks if not 0 <= b <= num_blocks]
    if wrong:
        raise UserError(f"--blocks {wrong[0]} is out of range: the model has blocks 1..{num_blocks} (0 = before any)")
    return blocks


def default_blocks(num_blocks: int) -> List[int]:
    """The merge states a picture shows unless asked: after a quarter, half, three quarters and all of the blocks."""
    return sorted({max(1, round(num_blocks * q)) for q in (0.25, 0.5, 0.75)} | {num_blocks})


def grid_shape(pre: Preprocessing, patch: Tuple[int, int]) -> Tuple[int, int]:
    return pre.input_size[1] // patch[0], pre.input_size[2] // patch[1]


def torch_source_maps(model: Any, images: np.ndarray, after_blocks: Sequence[int]) -> Dict[int, np.ndarray]:
    """Source maps ``(N, T, T0)`` of a ToMe-patched model after each of ``after_blocks`` (1-based; 0 = input).

    The state after block k is the source map of a copy patched with the same schedule cut after block k
    (later blocks merge nothing), so it is exactly what the model holds at that point.
    """
    import copy

    import torch

    from .models import patch

    cfg = getattr(model, "tome", None)
    if cfg is None:
        raise UserError("the model is not ToMe-patched: call tome_export.patch(model, r) first")
    work = copy.deepcopy(model).eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    maps = {}
    with torch.no_grad():
        for k in after_blocks:
            cut = list(cfg.r[:k]) + [0] * (len(cfg.r) - k)
            patch(work, cut, merge_impl=cfg.merge_impl, prop_attn=cfg.prop_attn)
            maps[k] = work.forward_with_source(x)[1].numpy()
    return maps


def model_merge_states(model: Any, image: Union[Image.Image, str, os.PathLike],
                       blocks: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, Tuple[int, int], List[MergeState]]:
    """(display image, patch size, merge states) of one image through a ToMe-patched PyTorch model.

    ``blocks``: states after those blocks (1-based); default: after the last block.
    """
    from .models import model_info, preprocessing

    info = model_info(model)
    pre = preprocessing(model)
    chw = pre(image)
    grid = grid_shape(pre, info.patch_size)
    blocks = list(blocks) if blocks is not None else [info.num_blocks]
    maps = torch_source_maps(model, chw[None], blocks)
    states = []
    for k in blocks:
        source = maps[k][0]
        title = f"after block {k}: {source.shape[0]} tokens" if k else f"input: {source.shape[0]} tokens"
        states.append(MergeState(title, source_labels(source, info.num_protected, grid), source.shape[0],
                                 info.num_protected))
    return display_image(chw, pre), tuple(info.patch_size), states


def artifact_patch_size(manifest: Manifest) -> Tuple[int, int]:
    """The patch size of a built artifact (recorded, or derived from the token count and the input size)."""
    if manifest.patch_size:
        return tuple(int(v) for v in manifest.patch_size)
    _, h, w = manifest.input.image_shape
    n = int(manifest.num_tokens) - int(manifest.num_protected)
    gh = int(round((n * h / w) ** 0.5))
    if gh < 1 or n % gh:
        raise UserError("cannot tell the artifact's patch grid from its manifest: rebuild it with this version")
    return h // gh, w // (n // gh)


def artifact_source_map(artifact: Artifact, chw: np.ndarray) -> np.ndarray:
    """The ``source`` output ``(T, T0)`` of an artifact for one preprocessed image, run by its own runner."""
    if SOURCE_NAME not in artifact.manifest.outputs:
        raise UserError(f"{str(artifact.directory)!r} has no graph with a 'source' output: rebuild it with "
                        f"--trace-source")
    with artifact.load() as runner:
        if SOURCE_NAME not in runner.output_names:
            raise UserError(f"{str(artifact.directory)!r} has no 'source' output although its manifest lists one: "
                            f"rebuild it")
        batch = runner.batch_size or 1
        x = np.repeat(chw[None].astype(runner.dtype), batch, axis=0)
        source = runner.infer(x, [SOURCE_NAME])[SOURCE_NAME]
    return np.asarray(source[0], dtype=np.float32)


def artifact_merge_state(directory: os.PathLike,
                         image: Union[Image.Image, str, os.PathLike]) -> Tuple[np.ndarray, Tuple[int, int], MergeState]:
    """(display image, patch size, final merge state) of one image through a built artifact (checksums verified)."""
    from .runtime import open_artifact

    artifact = open_artifact(directory)
    manifest = artifact.manifest
    pre = Preprocessing.from_dict(manifest.preprocessing)
    patch = artifact_patch_size(manifest)
    chw = pre(image)
    source = artifact_source_map(artifact, chw)
    protected = int(manifest.num_protected)
    try:
        labels = source_labels(source, protected, grid_shape(pre, patch))
    except ValueError as exc:
        raise ValidationError(f"the artifact's source output is not a ToMe merge ({exc}): rebuild it") from None
    title = f"{manifest.model['alias']} {manifest.target} graph: {source.shape[0]} tokens"
    return display_image(chw, pre), patch, MergeState(title, labels, source.shape[0], protected)


def picture(image: np.ndarray, patch: Tuple[int, int], states: Sequence[MergeState], fill: str = "mean",
            scale: int = 2, columns: int = 5, bare: Optional[bool] = None) -> Image.Image:
    """A grid of titled panels after the image as the model sees it; ``bare`` (default: with one state) the one
    state's picture alone."""
    panels = [render(image, s.labels, patch, fill=fill, scale=scale) for s in states]
    if len(panels) == 1 and (bare is None or bare):
        return Image.fromarray(panels[0])
    seen = np.repeat(np.repeat(np.asarray(image, np.uint8), scale, axis=0), scale, axis=1)
    titles = [f"{s.title} ({s.num_groups} groups)" for s in states]
    return compose([seen, *panels], [f"input {image.shape[1]}x{image.shape[0]}", *titles], columns)


def save_picture(img: Image.Image, path: os.PathLike) -> Path:
    """Write atomically (a temporary file renamed into place): an interrupted save leaves nothing."""
    path = Path(path)
    check_output_file(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def check_output_file(path: os.PathLike) -> None:
    """Refuse an output picture path that cannot be written, before any slow work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a directory: pass a picture file name such as out.png")
    formats = Image.registered_extensions()
    if path.suffix.lower() not in formats:
        raise UserError(f"cannot tell the picture format of {str(path)!r}: end the name with .png or .jpg")
    if formats[path.suffix.lower()] not in Image.SAVE:
        raise UserError(f"{str(path)!r}: PIL reads {formats[path.suffix.lower()]} pictures but cannot write them; "
                        f"end the name with .png or .jpg")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {str(path)!r}: {str(parent)!r} is not a writable directory")


# --- the whole job, as the command line runs it ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Which PyTorch model to picture, built and patched as ``tome-export`` would."""

    model: str
    r: Any = 16  # an RSpec
    weights: str = "pretrained"
    checkpoint: Optional[Path] = None
    seed: int = 0
    img_size: Optional[int] = None
    merge_impl: str = "gather"
    prop_attn: bool = True
    allow_large: bool = False  # skip the memory estimate's refusal


def visualize_model(image: Union[Image.Image, str, os.PathLike], source: ModelSource, blocks_text: Optional[str] = None,
                    warn: Any = lambda message: None) -> Tuple[np.ndarray, Tuple[int, int], List[MergeState]]:
    """(display image, patch size, merge states) of ``image`` through the model ``source`` names, patched with its
    schedule; ``blocks_text`` (``"1,6,12"``) picks states after those blocks (default :func:`default_blocks`);
    ``warn`` hears a schedule capped before its last block."""
    from .models import create_model, estimated_info, model_info, patch
    from .resources import check_img_size, check_memory, check_seed
    from .schedule import resolve_schedule

    check_img_size(source.img_size)
    check_seed(source.seed)
    kwargs = {"img_size": source.img_size} if source.img_size else {}
    estimate = estimated_info(source.model, **kwargs)
    if estimate is not None:  # as a build does: refused before the model allocates anything
        check_memory(estimate, 1, "visualize", source.allow_large)
    model, _ = create_model(source.model, weights=source.weights, checkpoint=source.checkpoint, seed=source.seed,
                            **kwargs)
    info = model_info(model)
    check_memory(info, 1, "visualize", source.allow_large)
    schedule = resolve_schedule(source.r, info.num_blocks, info.num_tokens, info.num_protected)
    blocks = parse_blocks(blocks_text, info.num_blocks) if blocks_text else default_blocks(info.num_blocks)
    if schedule.capped_early:
        warn(schedule.cap_message())
    patch(model, source.r, merge_impl=source.merge_impl, prop_attn=source.prop_attn)
    return model_merge_states(model, image, blocks)
