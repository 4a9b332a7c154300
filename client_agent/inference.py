"""Inference: load a model, predict, segment a NIfTI scan, evaluate a model on labelled folders.

Used by ``fedseg evaluate`` and ``fedseg segment`` (``client_agent.commands``), by the experiments
and by anyone scoring a checkpoint or a federation's model::

    loaded = load_model("best.pt")                       # or "global.frames", config_path="federation.toml"
    segment_file(loaded, "scan.nii.gz", "mask.nii.gz")   # the mask on the scan's own grid
    evaluate_model(loaded, "data/site-1")                # Dice, IoU, HD95 (mm), precision, recall

**Preprocessing is the training pipeline's**, everywhere: reorient to RAS+, z-score per channel
(over nonzero voxels unless the model was trained with ``normalize="volume"``), resize the *whole
volume* to the model's ``img_size``. The checkpoint records how (``extra["preprocess"]``), so
evaluation and segmentation repeat it exactly.

**Segmentation resolution (``mode="resize"``, the default).** Training resizes each whole scan,
whatever its size and spacing, to ``img_size``: the network learned anatomy at the scale "one
field of view per grid". A scan is therefore segmented the same way: z-score, resize the whole
scan to ``img_size``, predict (sliding windows of ``roi``; the default ``roi`` is the window the
network trained on, ``[model] patch_size``, or ``img_size`` when it trained on whole volumes, where
one window covers it), resample the class *probabilities* back to the scan's own grid (trilinear, then
argmax: smoother borders than resampling the label map by nearest neighbour), undo the
reorientation (:func:`client_agent.data.from_canonical`), and write a ``uint8`` class map with the scan's own shape and affine.
``mode="native"`` skips the resizing and slides ``roi`` windows over the scan at its own
resolution; it is right only when the scan's voxel spacing is that of the training grid (e.g. a
model trained on patches of scans at this spacing); a warning says when the spacing differs by
more than half from the one recorded in the checkpoint.

**Evaluation** scores, by default, exactly what ``segment`` would write, against the label as
stored (``grid="native"``, HD95 in mm from the scan's spacing). ``grid="model"`` scores on the
resized training grid instead, as sites' local validation and ``fedseg simulate``'s held-out
evaluation do, so its numbers are comparable with theirs.

Model files: a checkpoint from :func:`model.save_checkpoint` (``fedseg train``) rebuilds itself; a
``.frames`` model from a federation (``codec.save_tensors``: tensors only) needs the federation's
TOML (``--config``) for its architecture. Labels written and scored are model classes (after the
checkpoint's label map, if any), not raw label values.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from client_agent.data import NORMALIZE_MODES, pool_cases
from client_agent.training import METRIC_NAMES, autocast
from codec import atomic_writer

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_GRIDS",
    "SEGMENT_MODES",
    "LoadedModel",
    "SegmentResult",
    "evaluate_model",
    "format_metrics_table",
    "load_model",
    "predict_labels",
    "segment_file",
    "size3",
]

SEGMENT_MODES = ("spacing", "resize", "native")
EVAL_GRIDS = ("native", "model")


def size3(name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    """``64`` or ``(64, 64, 64)`` -> ``(64, 64, 64)``."""
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)  # type: ignore[arg-type]
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be one positive int or three (D, H, W), got {value!r}")
    return (values[0], values[1], values[2])


# --------------------------------------------------------------------------------------------
# Loading a model (checkpoint or federation .frames)
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A network ready for inference and what it needs to preprocess a scan as in training.

    ``preprocess`` holds ``normalize`` (``"nonzero"``/``"volume"``), ``label_map`` (``{raw: class}``
    or None) and ``grid_spacing_mm`` (median training spacing on the grid, or None if unknown).
    ``patch_size``: the window the network trained on (``[model] patch_size``), which predictions
    slide over the volume by default; None when it trained on whole ``img_size`` volumes.
    """

    net: nn.Module
    architecture: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    source: Path
    device: torch.device
    patch_size: tuple[int, int, int] | None = None

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.config["out_channels"])

    @property
    def img_size(self) -> tuple[int, int, int]:
        return size3("img_size", [int(v) for v in self.config["img_size"]])

    def window(self, roi: Sequence[int] | None = None) -> tuple[int, int, int]:
        """The prediction window: ``roi`` when given, else the training window, else ``img_size``."""
        if roi is not None:
            return size3("roi", list(roi))
        return self.patch_size or self.img_size


def _is_frames_file(path: Path) -> bool:
    import codec

    with open(path, "rb") as fh:
        return fh.read(len(codec.FILE_MAGIC)) == codec.FILE_MAGIC


def _federation_model_config(config_path: Path) -> Any:
    """The ``[model]`` section of a federation TOML, or of a ``fedseg simulate`` TOML (``[simulation]`` is ignored)."""
    from aggregator_service.config import load_federation_config

    if not Path(config_path).exists():
        raise FileNotFoundError(f"federation config {config_path} does not exist")
    return load_federation_config(config_path, extensions=("simulation",)).model


def _load_frames(path: Path, config_path: Path | None) -> tuple[nn.Module, str, dict[str, Any]]:
    import codec
    from model import build_model
    from model.checkpoint import check_state_dict

    if config_path is None:
        raise ValueError(
            f"{path} is a federation model (.frames: tensors only, no architecture); pass the federation's "
            "TOML with --config so the network can be rebuilt"
        )
    m = _federation_model_config(config_path)
    config = {"in_channels": m.in_channels, "out_channels": m.out_channels, "img_size": list(m.img_size), **dict(m.options)}
    arrays = codec.load_tensors(path)
    try:
        check_state_dict(m.architecture, config, arrays)
    except ValueError as exc:
        raise ValueError(
            f"{path} does not fit the [model] of {config_path}: {exc}; is it the same federation's model?"
        ) from None
    net = build_model(m.architecture, **config)
    state = net.state_dict()
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(state[k].dtype) for k in state})
    return net, m.architecture, config


def load_model(
    path: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    label_map: str | Mapping[Any, Any] | None = None,
) -> LoadedModel:
    """Load a ``fedseg train`` checkpoint or a federation's ``.frames`` model, in eval mode on ``device``.

    ``config_path`` (a federation or ``fedseg simulate`` TOML) is required for ``.frames`` and
    ignored, with a warning, for checkpoints (they carry their own config). ``label_map``
    overrides the checkpoint's (a ``.frames`` model has none).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither a checkpoint nor a frames file, a frames file without config, or
            weights that do not fit the configured network.
    """
    from client_agent.data import resolve_label_map
    from client_agent.training import pick_device
    from model import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    dev = pick_device(str(device)) if not isinstance(device, torch.device) else device
    preprocess: dict[str, Any] = {"normalize": "nonzero", "label_map": None, "grid_spacing_mm": None,
                                  "spacing_mm": None}
    if _is_frames_file(path):
        net, architecture, config = _load_frames(path, Path(config_path) if config_path is not None else None)
        model_config = _federation_model_config(Path(str(config_path)))
        preprocess["spacing_mm"] = float(model_config.spacing_mm) if model_config.spacing_mm > 0 else None
        patch = list(model_config.patch_size) or None
    else:
        if config_path is not None:
            logger.warning("%s is a checkpoint with its own model config; --config %s is ignored", path, config_path)
        try:
            net, meta = load_checkpoint(path, map_location="cpu")
        except ValueError:
            raise
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors for foreign files
            raise ValueError(
                f"{path} is neither a FedSegNet checkpoint (fedseg train) nor a federation model "
                f"(.frames): {type(exc).__name__}: {exc}"
            ) from exc
        architecture, config = meta["architecture"], dict(meta["config"])
        preprocess.update(meta.get("extra", {}).get("preprocess", {}))
        patch = preprocess.pop("patch_size", None)  # fedseg train --patch-size records it here
    if label_map is not None:
        preprocess["label_map"] = label_map
    resolved = resolve_label_map(preprocess.get("label_map"))
    preprocess["label_map"] = resolved
    if preprocess.get("normalize") not in NORMALIZE_MODES:
        raise ValueError(f"{path}: unknown normalisation {preprocess.get('normalize')!r}; allowed: {list(NORMALIZE_MODES)}")
    net.to(dev)
    net.eval()
    return LoadedModel(net=net, architecture=architecture, config=config, preprocess=preprocess, source=path, device=dev,
                       patch_size=size3("patch_size", [int(v) for v in patch]) if patch else None)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def _zscore_resize(image: np.ndarray, size: Sequence[int], normalize: str) -> np.ndarray:
    from client_agent.data import PreprocessConfig, preprocess_image

    return preprocess_image(image, config=PreprocessConfig(spatial_size=tuple(size), normalize=normalize))  # type: ignore[arg-type]


def _probabilities(loaded: LoadedModel, image: np.ndarray, roi: Sequence[int], overlap: float, amp: bool) -> torch.Tensor:
    """``(C, D, H, W)`` preprocessed image -> ``(K, D, H, W)`` class probabilities (float32, CPU)."""
    from model import sliding_window_predict

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(loaded.device)
    with autocast(loaded.device, amp):
        probs = sliding_window_predict(loaded.net, x, roi_size=roi, overlap=overlap)
    return probs[0].float().cpu()


def _check_channels(loaded: LoadedModel, image: np.ndarray, source: str) -> None:
    if image.shape[0] != loaded.in_channels:
        raise ValueError(
            f"{source} has {image.shape[0]} channel(s), the model {loaded.source} expects {loaded.in_channels}: "
            "pass one --input per modality in training order, or one 4D file with channels last"
        )


def predict_labels(
    loaded: LoadedModel,
    image: np.ndarray,
    spacing: Sequence[float],
    *,
    mode: Literal["resize", "native"] = "resize",
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
) -> np.ndarray:
    """Class map of a raw (not normalised) canonical image: ``(C, D, H, W)`` -> ``(D, H, W)`` uint8.

    ``mode="resize"``: z-score, resize to the model's ``img_size``, predict, resample the
    probabilities back to ``(D, H, W)`` trilinearly, argmax. ``mode="native"``: z-score and slide
    ``roi`` windows at the image's own resolution. ``roi`` defaults to :meth:`LoadedModel.window`.
    See the module docstring for when each is right.
    """
    from monai.transforms import Resize

    if mode not in SEGMENT_MODES:
        raise ValueError(f"mode must be one of {list(SEGMENT_MODES)}, got {mode!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {image.shape}")
    _check_channels(loaded, image, "the image")
    if loaded.num_classes > 256:
        raise ValueError(f"a uint8 class map holds at most 256 classes; the model has {loaded.num_classes}")
    window = loaded.window(roi)
    shape = tuple(int(s) for s in image.shape[1:])
    normalize = str(loaded.preprocess.get("normalize", "nonzero"))
    if mode == "resize":
        probs = _probabilities(loaded, _zscore_resize(image, loaded.img_size, normalize), window, overlap, amp)
        if tuple(probs.shape[1:]) != shape:
            resized = Resize(shape, mode="trilinear")(probs)
            probs = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
    else:
        _warn_if_spacing_differs(loaded, spacing)
        probs = _probabilities(loaded, _zscore_resize(image, shape, normalize), window, overlap, amp)
    return probs.argmax(dim=0).numpy().astype(np.uint8)


def _warn_if_spacing_differs(loaded: LoadedModel, spacing: Sequence[float]) -> None:
    trained = loaded.preprocess.get("grid_spacing_mm")
    if not trained:
        return
    ratios = [float(s) / float(t) for s, t in zip(spacing, trained) if float(t) > 0]
    if any(r > 1.5 or r < 1 / 1.5 for r in ratios):
        logger.warning(
            "native-resolution segmentation of a scan with spacing %s mm, but the model was trained on a grid "
            "of %s mm: expect poor predictions; use mode 'resize'",
            [round(float(s), 3) for s in spacing], [round(float(t), 3) for t in trained],
        )


# --------------------------------------------------------------------------------------------
# Segmentation of one scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_file` wrote: the mask's shape, the voxel count per class, the time taken."""

    output: Path
    shape: tuple[int, int, int]
    class_voxels: dict[int, int]
    seconds: float


def _check_nifti_name(path: Path) -> None:
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")) or path.name in (".nii", ".nii.gz"):
        raise ValueError(f"output {path} must be a NIfTI file name ending in .nii.gz or .nii")


def _write_mask(path: Path, mask: np.ndarray, reference: Any) -> None:
    """Write ``mask`` (uint8, the reference's voxel order) with the reference image's affine, atomically."""
    import nibabel as nib

    affine = np.asarray(reference.affine, dtype=np.float64)
    out = nib.Nifti1Image(mask.astype(np.uint8, copy=False), affine)
    out.set_data_dtype(np.uint8)
    header = reference.header
    out.set_qform(affine, code=int(header["qform_code"]) or 1)
    out.set_sform(affine, code=int(header["sform_code"]) or 1)
    out.header.set_xyzt_units(xyz=header.get_xyzt_units()[0])
    with atomic_writer(path) as fh:
        if path.name.endswith(".nii.gz"):
            # nibabel's own .nii.gz settings: level 1 (fast; masks compress well), no timestamp.
            with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) as gz:
                out.to_stream(gz)
        else:
            out.to_stream(cast(io.IOBase, fh))  # the writer's file is an io.BufferedWriter


def default_segment_mode(model: LoadedModel) -> str:
    """``"spacing"`` when the model records the spacing it was trained at, else ``"resize"``."""
    return "spacing" if model.preprocess.get("spacing_mm") else "resize"


def _segment_at_spacing(model: LoadedModel, path: Path, roi: Sequence[int] | None, overlap: float,
                        amp: bool) -> np.ndarray:
    """Resample the scan in world space to the model's spacing, predict, map the mask back (client_agent.spacing)."""
    from client_agent.spacing import from_model_grid, image_on_grid, load_scan

    spacing = model.preprocess.get("spacing_mm")
    if not spacing:
        raise ValueError(f"{model.source} records no voxel spacing ([model] spacing_mm); use --mode resize")
    if model.in_channels != 1:
        raise ValueError(f"mode 'spacing' takes one-channel models; {model.source} has {model.in_channels}: "
                         "use --mode resize")
    image, affine = load_scan(path)
    normalized, grid = image_on_grid(image, affine, spacing_mm=float(spacing), size=model.img_size,
                                     normalize=str(model.preprocess.get("normalize", "nonzero")))
    probs = _probabilities(model, normalized, model.window(roi), overlap, amp).numpy()
    return from_model_grid(probs, grid, shape=image.shape, affine=affine)


def segment_file(
    model: LoadedModel,
    inputs: Path | str | Sequence[Path | str],
    output: Path | str,
    *,
    mode: Literal["spacing", "resize", "native"] | None = None,
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
) -> SegmentResult:
    """Segment one scan and write its class map on the scan's own grid.

    ``inputs``: one NIfTI (3D, or 4D with channels last) or one 3D file per modality, in the
    channel order the model was trained with. The output is ``uint8`` model classes with the
    first input's spatial shape, voxel order and affine. See :func:`predict_labels` for ``mode``.

    Raises:
        client_agent.data.DataError: an input is missing or unreadable, or the modalities differ
            in shape.
        ValueError: wrong channel count, or an output name that is not ``.nii``/``.nii.gz``.
    """
    import nibabel as nib

    from client_agent.data import from_canonical, load_image

    start = time.perf_counter()
    files = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    output = Path(output)
    _check_nifti_name(output)
    mode = mode or default_segment_mode(model)  # type: ignore[assignment]
    if mode == "spacing":
        if len(files) != 1:
            raise ValueError(f"mode 'spacing' takes one input file, got {len(files)}")
        reference_img: Any = nib.load(str(files[0]))
        mask = _segment_at_spacing(model, files[0], roi, overlap, amp)
        _write_mask(output, mask, reference_img)
        counts = np.bincount(mask.ravel(), minlength=model.num_classes)
        return SegmentResult(output=output, shape=(int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])),
                             class_voxels={int(c): int(n) for c, n in enumerate(counts)},
                             seconds=time.perf_counter() - start)
    image, _, spacing = load_image(files, canonical=True)
    _check_channels(model, image, ", ".join(str(f) for f in files))
    reference: Any = nib.load(str(files[0]))  # already read by load_image; nibabel's types are loose
    labels = predict_labels(model, image, spacing, mode=mode, roi=roi, overlap=overlap, amp=amp)  # type: ignore[arg-type]
    mask = from_canonical(labels, np.asarray(reference.affine, dtype=np.float64))
    if mask.shape != tuple(reference.shape[:3]):  # an orientation bug must never write a misplaced mask
        raise RuntimeError(f"internal error: mask shape {mask.shape} differs from the input grid {reference.shape[:3]}")
    _write_mask(output, mask, reference)
    counts = np.bincount(mask.ravel(), minlength=model.num_classes)
    return SegmentResult(
        output=output,
        shape=(int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])),
        class_voxels={int(c): int(n) for c, n in enumerate(counts)},
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _mean_of(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in METRIC_NAMES}


def evaluate_model(
    model: LoadedModel,
    data_dirs: Path | str | Sequence[Path | str],
    *,
    grid: Literal["native", "model"] = "native",
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
    progress: Callable[[str, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Dice, IoU, HD95 (mm), precision and recall of ``model`` on every labelled case of ``data_dirs``.

    ``grid="native"``: predict as :func:`segment_file` does and score against the label as stored,
    with the scan's spacing. ``grid="model"``: score on the resized training grid, with the grid's
    spacing (what sites' validation reports). Labels go through the model's label map. Every case
    must pass :func:`client_agent.data.validate_cases`: an evaluation that silently skipped cases
    would not be comparable, so a bad case is an error naming its file.

    Returns ``{"model", "architecture", "data", "grid", "cases", "mean": {metric: mean over cases
    of the case's class mean}, "per_class": {"1": {metric: mean over cases}, …}, "per_case":
    [{"case_id", "mean", "per_class"}, …]}``; every number a finite float (see
    :func:`model.segmentation_metrics` for empty classes).
    """
    from client_agent.data import (
        DataError,
        PreprocessConfig,
        discover_cases,
        load_image,
        load_label,
        preprocess_case,
        remap_labels,
        validate_cases,
    )
    from model import segmentation_metrics

    if grid not in EVAL_GRIDS:
        raise ValueError(f"grid must be one of {list(EVAL_GRIDS)}, got {grid!r}")
    folders = [Path(data_dirs)] if isinstance(data_dirs, (str, os.PathLike)) else [Path(d) for d in data_dirs]
    if not folders:
        raise ValueError("evaluate_model needs at least one data folder")
    mapping = model.preprocess.get("label_map")
    num_classes = model.num_classes
    cases = pool_cases([(folder, discover_cases(folder)) for folder in folders])
    good, _ = validate_cases(cases, num_classes=num_classes, label_map=mapping, on_error="fail")
    config = PreprocessConfig(spatial_size=model.img_size, normalize=model.preprocess.get("normalize", "nonzero"))

    per_case: list[dict[str, Any]] = []
    for case in good:
        if grid == "model":
            volume = preprocess_case(case, config=config, label_map=mapping, num_classes=num_classes)
            pred = _probabilities(model, volume.image, model.window(roi), overlap, amp).argmax(dim=0).numpy()
            target, spacing = volume.label, volume.spacing
        else:
            image, _, spacing = load_image(case.image_paths, canonical=True)
            _check_channels(model, image, str(case.image_paths[0]))
            label, _ = load_label(case.label_path, canonical=True)
            if label.shape != image.shape[1:]:
                raise DataError(f"{case.label_path}: label shape {label.shape} differs from image shape {image.shape[1:]}")
            target = remap_labels(label, mapping)
            pred = predict_labels(model, image, spacing, mode="resize", roi=roi, overlap=overlap, amp=amp)
        scores = segmentation_metrics(pred, target, num_classes=num_classes, spacing=spacing)
        per_case.append({"case_id": case.case_id, "mean": scores["mean"], "per_class": scores["per_class"]})
        if progress is not None:
            progress(case.case_id, scores["mean"])

    classes = list(per_case[0]["per_class"])
    return {
        "model": str(model.source),
        "architecture": model.architecture,
        "data": [str(f) for f in folders],
        "grid": grid,
        "cases": len(per_case),
        "mean": _mean_of([c["mean"] for c in per_case]),
        "per_class": {cls: _mean_of([c["per_class"][cls] for c in per_case]) for cls in classes},
        "per_case": per_case,
    }


# The table's columns, in the order the project's tables print them (overlaps first, then distance,
# then the two ratios): every metric of METRIC_NAMES, with its heading.
_TABLE_COLUMNS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 mm", "precision": "precision", "recall": "recall"}
assert set(_TABLE_COLUMNS) == set(METRIC_NAMES), "a metric without a column in format_metrics_table"


def format_metrics_table(result: Mapping[str, Any]) -> str:
    """A Markdown table: one row per class and one for the mean; HD95 in mm."""
    header = ("| class | " + " | ".join(_TABLE_COLUMNS.values()) + " |\n| --- |"
              + " ---: |" * len(_TABLE_COLUMNS))
    rows = [
        f"| {name} | " + " | ".join(f"{m[k]:.2f}" if k == "hd95" else f"{m[k]:.4f}" for k in _TABLE_COLUMNS) + " |"
        for name, m in [*result["per_class"].items(), ("mean", result["mean"])]
    ]
    return "\n".join([header, *rows])
