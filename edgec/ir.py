"""Loading and saving ONNX models.

edgec works on :class:`onnx_ir.Model` in memory.  This module is the only place that touches
model files, so every command gets the same checks and the same guarantees:

- :func:`load_model` turns the usual mistakes (missing file, a file that is not ONNX, a model
  over protobuf's 2 GB limit without external data) into one-line :class:`~edgec.errors.ModelLoadError`.
- :func:`save_model` writes atomically: the model goes to a temporary file next to the target and
  is renamed into place only once complete, so a failure never leaves a half-written output.
  Models whose weights exceed the protobuf limit are saved with external data (``<name>.data``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from edgec.errors import InputError, ModelLoadError

#: protobuf refuses to parse or serialize messages of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: weights above this size are written as external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _looks_like_onnx(proto: onnx.ModelProto) -> bool:
    return bool(proto.opset_import) and proto.HasField("graph")


def load_proto(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load ``path`` as an ``onnx.ModelProto`` with user-facing errors."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file", "check the path")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, not an ONNX file", "pass the path of a .onnx file")
    size = p.stat().st_size
    if size >= PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{p}: {size / 2**30:.2f} GiB is over protobuf's 2 GB limit for a single ONNX file",
            "re-save it with external data: onnx.save(model, path, save_as_external_data=True)",
        )
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(
            f"{p}: not an ONNX model ({type(exc).__name__})",
            "give a file written by torch.onnx.export or onnx.save",
        ) from None
    if not _looks_like_onnx(proto):
        raise ModelLoadError(
            f"{p}: not an ONNX model (no graph or opset)",
            "give a file written by torch.onnx.export or onnx.save",
        )
    if load_external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(p.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{p}: external data could not be read: {exc}",
                "keep the .data file next to the model",
            ) from None
    return proto


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX file into an :class:`onnx_ir.Model` (external data loaded into memory)."""
    return from_proto(load_proto(path))


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def clone(model: ir.Model) -> ir.Model:
    """A deep copy of ``model`` (via protobuf, so no object is shared)."""
    return from_proto(to_proto(model))


def weight_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for init in proto.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
    return total


def model_hash(proto_or_model: onnx.ModelProto | ir.Model) -> str:
    """sha256 of the serialized model: identifies exactly which model an artifact came from."""
    proto = proto_or_model if isinstance(proto_or_model, onnx.ModelProto) else to_proto(proto_or_model)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{parent}: output directory does not exist", "create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual mode
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``proto`` to ``path`` atomically; large weights go to ``<name>.data``."""
    target = Path(path)
    if weight_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
        with atomic_path(target) as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return target
    # Write model and data with their final names into a private directory next to the target,
    # then move both into place: a failure part-way leaves nothing at the target path.
    data_name = target.name + ".data"
    parent = target.parent if str(target.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=parent) as tmpdir:
        onnx.save_model(
            proto,
            str(Path(tmpdir) / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        os.replace(Path(tmpdir) / data_name, parent / data_name)
        os.replace(Path(tmpdir) / target.name, target)
    return target


def save_model(model: ir.Model, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`save_proto`)."""
    return save_proto(to_proto(model), path)


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes()) if hasattr(model.graph, "all_nodes") else len(model.graph)


def count_params(model: ir.Model) -> int:
    """Number of scalar weights stored as initializers."""
    total = 0
    for value in model.graph.initializers.values():
        if value.shape is not None and value.shape.is_static():
            n = 1
            for d in value.shape:
                n *= int(d)
            total += n
    return total
