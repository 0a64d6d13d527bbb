"""ONNX files on disk, including models over protobuf's 2 GB limit.

A serialized protobuf message cannot exceed 2 GiB, so a larger model is written as ``NAME.onnx`` (the graph) plus
one data file ``NAME.onnx.data`` beside it holding every tensor, referenced by a relative location. Smaller models
stay one self-contained file. Loading a path with ``onnx.load`` reads the data file back from the graph's folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, List

from .errors import UserError

# Above this many bytes of tensors the model is written with external data: protobuf refuses 2 GiB, and the
# margin leaves room for the graph itself (nodes, names, metadata: well under 1 MB for a ViT).
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def data_location(path: Path) -> str:
    """The data file's name, relative to the graph's folder (``model.onnx`` → ``model.onnx.data``)."""
    return Path(path).name + ".data"


def tensor_bytes(model: Any) -> int:
    """Bytes of the tensors an ``onnx.ModelProto`` holds in memory, counted without serializing it (protobuf
    cannot even measure a message over 2 GiB: ``ByteSize`` serializes it)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in _tensors(model))


def needs_external_data(model: Any) -> bool:
    """Whether ``model`` (an ``onnx.ModelProto`` with its tensors in memory) is too big for one file."""
    return tensor_bytes(model) >= EXTERNAL_DATA_BYTES


def save_onnx(model: Any, path: os.PathLike) -> Path:
    """Write ``model`` to ``path``: one file, or with its tensors in ``path.data`` when over the limit.

    Over the limit the proto's tensors are moved out to the data file (the in-memory model then refers to it).
    A stale data file of an earlier save is replaced, never appended to.
    """
    import onnx

    path = Path(path)
    data = path.parent / data_location(path)
    data.unlink(missing_ok=True)
    if not needs_external_data(model):
        onnx.save_model(model, str(path))
        return path
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    os.chmod(data, path.stat().st_mode & 0o777)  # onnx creates it private; it ships with the graph
    return path


def carry_metadata(source: Any, target: Any) -> None:
    """Copy ``source``'s model metadata (version, r schedule, preprocessing) into ``target`` where it lacks a key:
    graphs derived from an export by tools that drop it (a second export, ``onnx.utils.Extractor``)."""
    present = {p.key for p in target.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in present:
            target.metadata_props.add(key=prop.key, value=prop.value)


def _tensors(model: Any) -> Any:
    """Every tensor of a model: initializers and node attributes, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def external_locations(model: Any) -> List[str]:
    """The data-file locations a model's tensors refer to (empty for a self-contained model)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    found = {ExternalDataInfo(t).location for t in _tensors(model) if uses_external_data(t)}
    return sorted(found)


def data_files(path: os.PathLike) -> List[Path]:
    """The data files the ONNX graph at ``path`` refers to (its weights are not loaded)."""
    import onnx

    path = Path(path)
    return [path.parent / rel for rel in external_locations(onnx.load(str(path), load_external_data=False))]


def _transfer(src: Path, dst: Path, transfer: Callable[[str, str], Any]) -> Path:
    """Move or copy a graph and its data file; a single data file is renamed after ``dst`` (``dst.data``) and
    the graph's references rewritten, so a copy beside its source never lands on the source's data file."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = external_locations(model)
    if len(locations) != 1:  # self-contained, or several data files (not written here): names kept as they are
        for rel in locations:
            transfer(str(src.parent / rel), str(dst.parent / rel))
        transfer(str(src), str(dst))
        return dst
    location = data_location(dst)
    transfer(str(src.parent / locations[0]), str(dst.parent / location))
    for tensor in _tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(dst))
    if transfer is shutil.move and src != dst:
        src.unlink()
    return dst


def move_onnx(src: os.PathLike, dst: os.PathLike) -> Path:
    """Move an ONNX graph and its data file (renamed ``dst.data``)."""
    return _transfer(Path(src), Path(dst), shutil.move)


def copy_onnx(src: os.PathLike, dst: os.PathLike) -> Path:
    """Copy an ONNX graph and its data file (the copy's named ``dst.data``)."""
    return _transfer(Path(src), Path(dst), shutil.copyfile)


def refuse_outside_data(path: Path) -> None:
    """Refuse an ONNX graph whose external data lies outside the graph's own folder (``..``, absolute paths,
    symlinks leading out)."""
    from .manifest import confined

    try:
        import onnx
    except ImportError:  # without onnx, ONNX Runtime's own check refuses locations outside the model's folder
        return
    for rel in external_locations(onnx.load(str(path), load_external_data=False)):
        if confined(path.parent, rel) is None:
            raise UserError(f"{path} keeps its weights in {rel!r}, which is not a file inside "
                            f"{str(path.parent)!r}: an artifact directory only refers to its own files; rebuild it")
