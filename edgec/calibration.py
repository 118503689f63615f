"""Calibration data for post-training quantization.

A calibration set is a tuple of :class:`Sample` objects (arrays named after the model's inputs,
optionally a class label).  Sources build one for a model's input specs:

- :class:`ImageFolder`: image files (``.png .jpg .jpeg .bmp .ppm .tif``) run through
  :class:`Preprocess` (resize the shorter side to ``size / crop_fraction``, centre-crop to the
  model's input ``H x W``, ``x' = (x * scale - mean[c]) / std[c]``, NCHW or NHWC).
- :class:`NpyFiles`: ``.npy`` files holding one sample (the input's shape, with or without the
  batch dimension) or a stack of samples ``[N, ...]``.
- :class:`BuiltinDataset`: data that ships inside installed packages, no download:
  ``digits`` / ``digits-test`` (scikit-learn's 1,797 handwritten digits, a fixed 75/25 split,
  pixel ``v / 16`` then the preprocessing's mean/std) and ``photos`` / ``photos-test``
  (scikit-image's bundled photographs, disjoint images, several crops of each).
- :class:`ArraySource`: arrays already in memory (tests, notebooks).

:meth:`CalibrationSet.validate` rejects an empty set and samples whose shape or dtype does not
match the model, with the expected shape in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgec.errors import InputError, UnknownNameError
from edgec.verify import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

#: seed of the fixed train/test split of the digits dataset (bench/train_digits.py uses it too)
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Sample:
    """One model input set: ``arrays[i]`` feeds input ``names[i]``; ``label`` if known."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    label: int | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        """The onnxruntime feed mapping (built at the call site, never passed between stages)."""
        return dict(zip(self.names, self.arrays, strict=True))


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Samples plus where they came from."""

    description: str
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def labels(self) -> np.ndarray | None:
        if not self.samples or any(s.label is None for s in self.samples):
            return None
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def take(self, n: int) -> CalibrationSet:
        return CalibrationSet(self.description, self.samples[:n])

    def validate(self, specs: Sequence[TensorSpec]) -> None:
        """Raise :class:`InputError` if the set is empty or does not fit the model's inputs."""
        if not self.samples:
            raise InputError(f"calibration set {self.description} is empty", "give at least one sample (16-256 is typical)")
        want = {s.name: s for s in specs}
        for i, sample in enumerate(self.samples):
            if set(sample.names) != set(want):
                raise InputError(
                    f"calibration sample {i} of {self.description} feeds {sorted(sample.names)}, the model's inputs are {sorted(want)}",
                    "give one array per model input",
                )
            for name, arr in zip(sample.names, sample.arrays, strict=True):
                spec = want[name]
                if tuple(arr.shape) != tuple(spec.shape):
                    raise InputError(
                        f"calibration sample {i} of {self.description} has shape {list(arr.shape)} for input {name!r}, "
                        f"the model expects {list(spec.shape)}",
                        "resize the data (images are resized automatically) or export the model for this shape",
                    )
                if arr.dtype != spec.dtype:
                    raise InputError(
                        f"calibration sample {i} of {self.description} is {arr.dtype} for input {name!r}, the model expects {spec.dtype}",
                        f"convert it with arr.astype(np.{np.dtype(spec.dtype).name})",
                    )
                if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                    raise InputError(f"calibration sample {i} of {self.description} contains NaN or inf")


@runtime_checkable
class CalibrationSource(Protocol):
    """Anything that can produce a :class:`CalibrationSet` for a model's inputs."""

    def load(self, specs: Sequence[TensorSpec], limit: int | None = None) -> CalibrationSet: ...


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: ``x' = (x * scale - mean[c]) / std[c]`` after resize and centre crop.

    Defaults are ImageNet's (RGB, pixels scaled to [0, 1]).  ``crop_fraction=1`` resizes
    straight to the input size.
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    layout: str = "NCHW"
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise InputError(f"layout {self.layout!r} is not NCHW or NHWC")
        if len(self.mean) != len(self.std) or any(s == 0 for s in self.std):
            raise InputError("mean and std need the same number of entries and std must be non-zero")

    def geometry(self, spec: TensorSpec) -> tuple[int, int, int]:
        """(channels, height, width) of the model input ``spec``."""
        if len(spec.shape) != 4:
            raise InputError(
                f"input {spec.name!r} has shape {list(spec.shape)}; images need a 4-d {self.layout} input",
                "use --calib with .npy files for non-image inputs",
            )
        if self.layout == "NCHW":
            _, c, h, w = spec.shape
        else:
            _, h, w, c = spec.shape
        if c not in (1, 3):
            raise InputError(f"input {spec.name!r} has {c} channels; images give 1 or 3", "use .npy files instead")
        return c, h, w

    def normalize(self, hwc: np.ndarray, spec: TensorSpec) -> np.ndarray:
        """``hwc`` (already ``H x W x C``, raw pixel values) -> one batch-1 model input."""
        c = hwc.shape[2]
        x = hwc.astype(np.float32) * np.float32(self.scale)
        mean = np.resize(np.asarray(self.mean, np.float32), c)
        std = np.resize(np.asarray(self.std, np.float32), c)
        x = (x - mean) / std
        x = x.transpose(2, 0, 1)[None] if self.layout == "NCHW" else x[None]
        return np.ascontiguousarray(x.astype(spec.dtype))

    def image(self, pixels: np.ndarray, spec: TensorSpec, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """A uint8 image (``H x W`` or ``H x W x C``) -> model input; ``box`` selects a crop first
        (fractions ``left, top, right, bottom``)."""
        from PIL import Image

        c, h, w = self.geometry(spec)
        arr = np.asarray(pixels)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img = img.convert("L" if c == 1 else "RGB")
        if box is not None:
            W, H = img.size
            img = img.crop((int(box[0] * W), int(box[1] * H), int(box[2] * W), int(box[3] * H)))
        W, H = img.size
        if self.crop_fraction < 1.0:
            k = max(h / H, w / W) / self.crop_fraction
            img = img.resize((max(w, round(W * k)), max(h, round(H * k))), Image.BILINEAR)
            W, H = img.size
            left, top = (W - w) // 2, (H - h) // 2
            img = img.crop((left, top, left + w, top + h))
        else:
            img = img.resize((w, h), Image.BILINEAR)
        hwc = np.asarray(img)
        if hwc.ndim == 2:
            hwc = hwc[:, :, None]
        return self.normalize(hwc, spec)


def _single_input(specs: Sequence[TensorSpec], what: str) -> TensorSpec:
    if len(specs) != 1:
        raise InputError(
            f"{what} feeds a single input; the model has {len(specs)} ({', '.join(s.name for s in specs)})",
            "use .npy files named <input>.<n>.npy or an ArraySource",
        )
    return specs[0]


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """Every image file under ``path`` (sorted, recursive), preprocessed for the model."""

    path: Path
    preprocess: Preprocess = Preprocess()

    def load(self, specs: Sequence[TensorSpec], limit: int | None = None) -> CalibrationSet:
        from PIL import Image, UnidentifiedImageError

        spec = _single_input(specs, "an image folder")
        files = sorted(p for p in Path(self.path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if limit is not None:
            files = files[:limit]
        samples = []
        for f in files:
            try:
                with Image.open(f) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"{f}: not a readable image ({type(exc).__name__})", "remove it from the folder") from None
            samples.append(Sample((spec.name,), (self.preprocess.image(pixels, spec),)))
        return CalibrationSet(f"folder {self.path}", tuple(samples))


@dataclasses.dataclass(frozen=True)
class NpyFiles:
    """``.npy`` files under ``path``: each one sample or a stack ``[N, ...]`` of samples.

    Single-input models take every file; a multi-input model's files are named
    ``<input>.<anything>.npy`` and matched in sorted order.
    """

    path: Path

    def _arrays(self, files: Sequence[Path], spec: TensorSpec) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for f in files:
            try:
                arr = np.load(f, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(f"{f}: not a readable .npy file ({exc})") from None
            if arr.dtype != spec.dtype and np.issubdtype(arr.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
                arr = arr.astype(spec.dtype)
            shape = tuple(spec.shape)
            if arr.shape == shape:
                out.append(arr)
            elif arr.shape == shape[1:] and shape[:1] == (1,):
                out.append(arr[None])
            elif arr.ndim == len(shape) and arr.shape[1:] == shape[1:] and shape[0] == 1:
                out.extend(arr[i : i + 1] for i in range(arr.shape[0]))
            else:
                out.append(arr)  # validate() reports the shape mismatch with the expected shape
        return out

    def load(self, specs: Sequence[TensorSpec], limit: int | None = None) -> CalibrationSet:
        root = Path(self.path)
        files = sorted(root.rglob("*.npy")) if root.is_dir() else [root]
        if len(specs) == 1:
            arrays = self._arrays(files, specs[0])
            samples = [Sample((specs[0].name,), (a,)) for a in arrays]
        else:
            per_input = [self._arrays([f for f in files if f.name.startswith(s.name + ".")], s) for s in specs]
            n = min((len(a) for a in per_input), default=0)
            names = tuple(s.name for s in specs)
            samples = [Sample(names, tuple(a[i] for a in per_input)) for i in range(n)]
        if limit is not None:
            samples = samples[:limit]
        return CalibrationSet(f"npy {self.path}", tuple(samples))


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """In-memory samples for a single-input model: ``arrays[i]`` is one input (batch 1)."""

    arrays: tuple[np.ndarray, ...]
    labels: tuple[int, ...] | None = None
    description: str = "arrays"

    def load(self, specs: Sequence[TensorSpec], limit: int | None = None) -> CalibrationSet:
        spec = _single_input(specs, "an ArraySource")
        labels = self.labels if self.labels is not None else (None,) * len(self.arrays)
        samples = tuple(Sample((spec.name,), (np.asarray(a),), lab) for a, lab in zip(self.arrays, labels, strict=True))
        return CalibrationSet(self.description, samples[:limit] if limit is not None else samples)


# --- built-in datasets -----------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as ``(x_train, y_train, x_test, y_test)``; ``x`` is ``[N, 8, 8]`` in [0, 16]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.images.astype(np.float32), d.target.astype(np.int64), test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED, stratify=d.target,
    )
    return x_tr, y_tr, x_te, y_te


#: preprocessing of the digits dataset: pixel / 16, then (x - 0.5) / 0.5 -> [-1, 1]
DIGITS_PREPROCESS = Preprocess(mean=(0.5,), std=(0.5,), scale=1 / 16, crop_fraction=1.0)


def digits_inputs(images: np.ndarray, spec: TensorSpec, preprocess: Preprocess = DIGITS_PREPROCESS) -> np.ndarray:
    """``[N, 8, 8]`` digits -> ``[N, ...]`` model inputs (resized to the input's H x W, channels repeated)."""
    c, h, w = preprocess.geometry(spec)
    x = np.asarray(images, np.float32)
    if (h, w) != (8, 8):
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in x])
    hwc = np.repeat(x[..., None], c, axis=-1)
    return np.concatenate([preprocess.normalize(im, spec) for im in hwc]) if len(hwc) else np.zeros((0, *spec.shape[1:]), spec.dtype)


#: scikit-image photographs bundled with the package (no download), disjoint calibration / test images
PHOTOS_CALIB = ("hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon", "clock", "brick", "grass", "gravel", "cell", "text", "page", "colorwheel")
PHOTOS_TEST = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
#: crops taken of every photo (fractions left, top, right, bottom): the whole image, 4 quadrants, 4 overlapping centre crops
PHOTO_CROPS = (
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.6, 0.6), (0.4, 0.0, 1.0, 0.6), (0.0, 0.4, 0.6, 1.0), (0.4, 0.4, 1.0, 1.0),
    (0.15, 0.15, 0.85, 0.85), (0.1, 0.2, 0.7, 0.8), (0.3, 0.2, 0.9, 0.8), (0.2, 0.05, 0.8, 0.65),
)


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data as data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return np.asarray(getattr(data, name)())


@dataclasses.dataclass(frozen=True)
class BuiltinDataset:
    """A dataset shipped inside an installed package: see :data:`BUILTIN_DATASETS`."""

    name: str
    preprocess: Preprocess | None = None

    def __post_init__(self) -> None:
        if self.name not in BUILTIN_DATASETS:
            import difflib

            close = difflib.get_close_matches(self.name, BUILTIN_DATASETS, n=1)
            raise UnknownNameError(
                f"unknown calibration dataset {self.name!r}",
                (f"did you mean {close[0]!r}? " if close else "") + f"built-in: {', '.join(BUILTIN_DATASETS)}",
            )

    def load(self, specs: Sequence[TensorSpec], limit: int | None = None) -> CalibrationSet:
        spec = _single_input(specs, f"dataset {self.name}")
        if self.name.startswith("digits"):
            x_tr, y_tr, x_te, y_te = digits_split()
            x, y = (x_te, y_te) if self.name == "digits-test" else (x_tr, y_tr)
            if limit is not None:
                x, y = x[:limit], y[:limit]
            inputs = digits_inputs(x, spec, self.preprocess or DIGITS_PREPROCESS)
            samples = tuple(Sample((spec.name,), (inputs[i : i + 1],), int(y[i])) for i in range(len(y)))
        else:
            pre = self.preprocess or Preprocess()
            names = PHOTOS_TEST if self.name == "photos-test" else PHOTOS_CALIB
            samples_list = []
            for n in names:
                pixels = skimage_photo(n)
                for box in PHOTO_CROPS:
                    samples_list.append(Sample((spec.name,), (pre.image(pixels, spec, box),)))
            samples = tuple(samples_list[:limit] if limit is not None else samples_list)
        return CalibrationSet(f"dataset {self.name}", samples)


BUILTIN_DATASETS: dict[str, str] = {
    "digits": "scikit-learn handwritten digits, training split (1,347 images, labelled)",
    "digits-test": "scikit-learn handwritten digits, held-out split (450 images, labelled)",
    "photos": f"scikit-image photographs ({', '.join(PHOTOS_CALIB)}), {len(PHOTO_CROPS)} crops each",
    "photos-test": f"scikit-image photographs ({', '.join(PHOTOS_TEST)}), {len(PHOTO_CROPS)} crops each",
}


def source_for(path: Path | None = None, dataset: str | None = None, preprocess: Preprocess | None = None) -> CalibrationSource:
    """The source behind ``--calib PATH`` (images or .npy files) or ``--calib-dataset NAME``."""
    if (path is None) == (dataset is None):
        raise InputError("give calibration data: --calib DIR or --calib-dataset NAME (one of them)",
                         f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    if dataset is not None:
        return BuiltinDataset(dataset, preprocess)
    p = Path(path)  # type: ignore[arg-type]
    if not p.exists():
        raise InputError(f"{p}: no such file or directory", "give a folder of images or .npy files")
    if p.is_file():
        if p.suffix == ".npy":
            return NpyFiles(p)
        raise InputError(f"{p}: a calibration file must be .npy", "or give a folder of images")
    has_npy = any(p.rglob("*.npy"))
    has_img = any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.rglob("*"))
    if has_npy and has_img:
        raise InputError(f"{p}: holds both .npy files and images", "keep one kind per folder")
    if has_npy:
        return NpyFiles(p)
    return ImageFolder(p, preprocess or Preprocess())
