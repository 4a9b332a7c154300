"""Hand a trained model to the MONAI world: TorchScript, ONNX, or a MONAI bundle (``fedseg export``).

    fedseg export --model best.pt|global.frames [--config federation.toml] --format torchscript|onnx|bundle --out DIR

- ``torchscript``: ``DIR/model.ts``, a traced network that loads with ``torch.jit.load`` and
  needs no FedSegNet code.
- ``onnx``: ``DIR/model.onnx`` (opset 18, torch's ``dynamo`` exporter), checked under
  ``onnxruntime`` against torch on a random input before it is written: the largest logit
  difference must stay within :data:`ONNX_ATOL` (measured: about 4e-6 for the default network).
- ``bundle``: a MONAI bundle that MONAI's own runner executes on a NIfTI scan and that writes the
  same mask as ``fedseg segment`` (``mode="resize"``)::

      DIR/configs/metadata.json    spacing, normalisation, channel and class names, versions
      DIR/configs/inference.json   LoadImage → RAS → z-score → resize to img_size → model →
                                   softmax → invert the resize and reorientation → argmax → NIfTI
      DIR/models/model.pt          the weights (a plain state_dict, ``torch.load(weights_only=True)``)
      DIR/models/model.ts          the TorchScript network inference.json runs
      DIR/README.md                how to run it

  Run it with ``python -m monai.bundle run --config_file DIR/configs/inference.json
  --bundle_root DIR --image scan.nii.gz --output_dir OUT``.

Exported networks take the model's grid, ``(B, in_channels, *img_size)``, and return logits
``(B, out_channels, *img_size)``: the resize of the whole scan to ``img_size`` that training and
``fedseg segment`` use happens outside the network (in the bundle, in its preprocessing).

Tracing records one path through the network, so every export is checked against the eager
network on a second, different input; a network whose output depends on data-dependent Python
control flow fails that check with :class:`ExportError` instead of being written wrong. Files are
written to a temporary folder beside ``DIR`` and renamed into place, and an existing non-empty
``DIR`` is refused, so an export never leaves half a bundle or overwrites an earlier one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_ATOL",
    "TRACE_ATOL",
    "ExportError",
    "ExportResult",
    "bundle_inference_config",
    "bundle_metadata",
    "export_model",
]

EXPORT_FORMATS = ("torchscript", "onnx", "bundle")
#: largest |logit difference| allowed between onnxruntime and torch on the same input
ONNX_ATOL = 1e-3
#: largest |logit difference| allowed between the traced and the eager network on a fresh input
TRACE_ATOL = 1e-4
BUNDLE_VERSION = "0.1.0"
_METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


class ExportError(ValueError):
    """The model cannot be exported faithfully in the requested format; the message says why."""


class _Exportable(Protocol):
    """What an export needs of a loaded model (``LoadedModel`` from ``fedseg``'s inference code)."""

    net: nn.Module
    architecture: str
    config: dict[str, Any]
    preprocess: dict[str, Any]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote, and how closely the export reproduces the eager network."""

    out_dir: Path
    files: tuple[Path, ...]
    max_abs_diff: float
    """Largest |logit difference| from the eager network on a random check input."""


def _img_size(loaded: _Exportable) -> tuple[int, int, int]:
    size = [int(v) for v in loaded.config["img_size"]]
    if len(size) == 1:
        size = size * 3
    if len(size) != 3:
        raise ExportError(f"img_size must be one or three ints, got {loaded.config['img_size']!r}")
    return (size[0], size[1], size[2])


def _window(loaded: _Exportable) -> tuple[int, int, int]:
    """What the network takes: the window it trained on (``[model] patch_size``), else the whole grid."""
    patch = getattr(loaded, "patch_size", None)
    return (int(patch[0]), int(patch[1]), int(patch[2])) if patch else _img_size(loaded)


def _example(loaded: _Exportable, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, int(loaded.config["in_channels"]), *_window(loaded)), generator=gen)


def _eager_cpu(loaded: _Exportable) -> nn.Module:
    net = loaded.net.to("cpu")
    net.eval()
    return net


@contextlib.contextmanager
def _input_independent_tensors_as_constants(net: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Make the tracer store the position encoding as a constant tensor, not as the ops that build it.

    Traced ops that create a tensor (``arange``, ``zeros``) record the export machine's device as
    a constant, so a network traced on a CPU would build its position encoding on the CPU when
    run on a GPU and fail there. A tensor computed outside the trace is stored as a constant
    instead, and ``torch.jit.load(map_location=…)`` moves constants with the weights. The
    encoding depends only on the grid (fixed for an export), so this loses nothing.
    """
    import model.blocks as blocks

    original = blocks.sinusoidal_position_encoding_3d
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def cached(size: tuple[int, int, int], dim: int, *, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (tuple(int(v) for v in size), int(dim), dtype)
        if key not in cache:
            cache[key] = original(size, dim, device=device, dtype=dtype)
        return cache[key]

    blocks.sinusoidal_position_encoding_3d = cached  # type: ignore[assignment]
    try:
        with torch.no_grad():
            net(example)  # computes the encodings outside the trace
        yield
    finally:
        blocks.sinusoidal_position_encoding_3d = original  # type: ignore[assignment]


def _pins_a_device(traced: torch.jit.ScriptModule) -> bool:
    """True when the traced graph creates tensors on a fixed device (it then runs on the CPU only)."""
    return 'Device = prim::Constant[value="cpu"]' in str(traced.inlined_graph)


def _trace(loaded: _Exportable) -> tuple[torch.jit.ScriptModule, float]:
    """Trace on one input, then compare with the eager network on another."""
    net = _eager_cpu(loaded)
    first, second = _example(loaded, 0), _example(loaded, 1)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _input_independent_tensors_as_constants(net, first):
            # The tracer warns about every Python int it records (shapes of a fixed-size grid)
            # and every constant it stores; the check below decides whether the trace is faithful.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, first, check_trace=False)
            diff = float((traced(second) - net(second)).abs().max())
    except Exception as exc:  # the tracer raises many types (RuntimeError, TypeError, torch.jit.Error)
        raise ExportError(f"{loaded.architecture}: TorchScript tracing failed: {type(exc).__name__}: {exc}") from exc
    if not diff <= TRACE_ATOL:
        raise ExportError(
            f"{loaded.architecture}: the traced network differs from the eager one by {diff:.3g} on a second input "
            f"(allowed {TRACE_ATOL}): its forward pass has data-dependent control flow that tracing cannot record"
        )
    return traced, diff


def _write_torchscript(loaded: _Exportable, dest: Path) -> tuple[float, bool]:
    """Write the traced network; returns its difference from eager and whether it is CPU-only."""
    traced, diff = _trace(loaded)
    torch.jit.save(traced, str(dest))
    cpu_only = _pins_a_device(traced)
    if cpu_only:
        log.warning("%s: the traced network creates tensors on the CPU inside its forward pass; "
                    "it runs on the CPU only (the bundle's inference.json uses the CPU)", loaded.architecture)
    return diff, cpu_only


def _write_onnx(loaded: _Exportable, dest: Path) -> float:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'fedsegnet[export]' ({exc})") from exc
    net = _eager_cpu(loaded)
    first, second = _example(loaded, 0), _example(loaded, 1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (first,), str(dest), input_names=["image"], output_names=["logits"], dynamo=True,
                external_data=False, opset_version=18, verbose=False,
            )
    except Exception as exc:  # torch.export raises for data-dependent control flow, unsupported ops, …
        raise ExportError(f"{loaded.architecture}: ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x in (first, second):
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        diff = max(diff, float(np.abs(got - expected).max()))
    if not diff <= ONNX_ATOL:
        raise ExportError(
            f"{loaded.architecture}: onnxruntime's logits differ from torch's by {diff:.3g} (allowed {ONNX_ATOL}); not written"
        )
    return diff


def _names(given: Sequence[str] | None, recorded: Any, count: int, what: str, default: Callable[[int], str]) -> list[str]:
    names = list(given) if given else (list(recorded) if isinstance(recorded, (list, tuple)) else None)
    if names is None:
        return [default(i) for i in range(count)]
    if len(names) != count or any(not str(n).strip() for n in names):
        raise ExportError(f"{what} must be {count} non-empty names (the model has {count}), got {names}")
    return [str(n) for n in names]


def bundle_metadata(
    loaded: _Exportable, *, channel_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """``configs/metadata.json`` of the bundle: MONAI's fields plus the preprocessing a scan needs."""
    import monai

    size, window = list(_img_size(loaded)), list(_window(loaded))
    channels = _names(channel_names, loaded.preprocess.get("channel_names"), int(loaded.config["in_channels"]),
                      "channel names", lambda i: f"channel {i}")
    classes = _names(class_names, loaded.preprocess.get("class_names"), int(loaded.config["out_channels"]),
                     "class names", lambda i: "background" if i == 0 else f"class {i}")
    spacing = loaded.preprocess.get("grid_spacing_mm")
    label_map = loaded.preprocess.get("label_map")
    return {
        "schema": _METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported by fedseg export"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel")},
        "name": f"FedSegNet {loaded.architecture}",
        "task": "3D segmentation",
        "description": (
            "A FedSegNet model. The whole scan is reoriented to RAS, z-scored per channel and resized to "
            f"{size}; class probabilities are resized back to the scan's grid and the argmax is written with "
            "the scan's own affine."
        ),
        "authors": "FedSegNet federation",
        "copyright": "the federation's members",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "MR", "num_channels": len(channels),
                    "spatial_shape": window, "dtype": "float32", "value_range": [], "is_patch_data": window != size,
                    "channel_def": {str(i): n for i, n in enumerate(channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": len(classes),
                    "spatial_shape": window, "dtype": "float32", "value_range": [0, 1], "is_patch_data": window != size,
                    "channel_def": {str(i): n for i, n in enumerate(classes)},
                }
            },
        },
        # What a scan needs before the network sees it; the same as training and fedseg segment.
        "preprocessing": {
            "orientation": "RAS",
            "normalization": str(loaded.preprocess.get("normalize", "nonzero")),
            "normalization_doc": "z-score per channel over nonzero voxels ('nonzero') or the whole volume ('volume')",
            "spatial_size": size,
            "spacing_mm": [float(s) for s in spacing] if spacing else None,
            "spacing_doc": "median voxel spacing of the training scans on the model grid (None: not recorded)",
            "label_map": {str(k): int(v) for k, v in label_map.items()} if label_map else None,
        },
        "fedsegnet": {"architecture": loaded.architecture, "config": loaded.config},
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def bundle_inference_config(loaded: _Exportable, *, cpu_only: bool = False) -> dict[str, Any]:
    """``configs/inference.json``: MONAI transforms that repeat ``fedseg segment``'s ``resize`` mode.

    Plain bundle expressions (no ignite evaluator, so MONAI's runner needs nothing beyond
    torch, monai and nibabel): ``run`` loads the scan named by ``image``, predicts and writes
    ``<output_dir>/<scan>_seg.nii.gz``.
    """
    size = list(_img_size(loaded))
    nonzero = str(loaded.preprocess.get("normalize", "nonzero")) == "nonzero"
    return {
        "imports": ["$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "image": "",
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "device": "$torch.device('cpu')" if cpu_only else "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "network": "$@network_def.eval()",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
                 "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": nonzero, "channel_wise": True},
                {"_target_": "Resized", "keys": "image", "spatial_size": size, "mode": "trilinear"},
            ],
        },
        # Windows of what the network trained on slide over the resized scan, as in fedseg segment
        # (one window covers it when the network trained on whole volumes).
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(_window(loaded)), "sw_batch_size": 1, "overlap": 0.25,
                    "mode": "gaussian"},
        "predict": (
            "$lambda d: {**d, 'pred': torch.softmax(@inferer(d['image'][None].to(@device), @network).float(), dim=1)"
            "[0].cpu()}"
        ),
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                 "output_postfix": "@output_postfix", "output_dtype": "$numpy.uint8", "resample": False,
                 "separate_folder": False, "print_log": False},
            ],
        },
        "run": ["$torch.set_grad_enabled(False)", "$@postprocessing(@predict(@preprocessing({'image': @image})))"],
    }


_BUNDLE_README = """# {name}

A MONAI bundle exported by `fedseg export`. Segment one NIfTI scan with MONAI's runner:

    python -m monai.bundle run --config_file {{BUNDLE}}/configs/inference.json \\
        --bundle_root {{BUNDLE}} --image scan.nii.gz --output_dir out/

The mask `out/scan_seg.nii.gz` (uint8 classes, the scan's own grid and affine) is the one
`fedseg segment --mode resize` writes. Input: {channels}. Classes: {classes}.
Preprocessing (in configs/inference.json, described in configs/metadata.json): reorient to RAS,
z-score per channel ({normalize}), resize the whole scan to {size}.

`models/model.ts` is a TorchScript network on the model grid, `(B, {in_ch}, {grid})` ->
logits `(B, {out_ch}, {grid})`; `models/model.pt` holds its weights as a plain state_dict for
`{architecture}` with the configuration in `configs/metadata.json` (`fedsegnet`).
"""


def _write_bundle(loaded: _Exportable, root: Path, channel_names: Sequence[str] | None,
                  class_names: Sequence[str] | None) -> float:
    metadata = bundle_metadata(loaded, channel_names=channel_names, class_names=class_names)
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    diff, cpu_only = _write_torchscript(loaded, root / "models" / "model.ts")
    state = {k: v.detach().cpu().clone() for k, v in loaded.net.state_dict().items()}
    torch.save(state, root / "models" / "model.pt")
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (root / "configs" / "inference.json").write_text(json.dumps(bundle_inference_config(loaded, cpu_only=cpu_only), indent=2) + "\n")
    fmt = metadata["network_data_format"]
    size = metadata["preprocessing"]["spatial_size"]
    (root / "README.md").write_text(_BUNDLE_README.format(
        name=metadata["name"], channels=", ".join(fmt["inputs"]["image"]["channel_def"].values()),
        classes=", ".join(f"{k} {v}" for k, v in fmt["outputs"]["pred"]["channel_def"].items()),
        normalize=metadata["preprocessing"]["normalization"], size=size, in_ch=fmt["inputs"]["image"]["num_channels"],
        out_ch=fmt["outputs"]["pred"]["num_channels"], grid=", ".join(str(s) for s in size),
        architecture=loaded.architecture,
    ))
    return diff


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"--out {out_dir} exists and is not an empty folder; choose a new folder (nothing was overwritten)")


def export_model(
    loaded: _Exportable,
    fmt: str,
    out_dir: str | os.PathLike[str],
    *,
    channel_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``loaded`` (``net``, ``architecture``, ``config``, ``preprocess``) as ``fmt`` into the new folder ``out_dir``.

    Raises:
        ExportError: unknown format, an ``out_dir`` that is not empty, names that do not fit the
            model, or a network that cannot be exported faithfully (the message says which step failed).
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "torchscript":
            diff, _ = _write_torchscript(loaded, tmp / "model.ts")
        elif fmt == "onnx":
            diff = _write_onnx(loaded, tmp / "model.onnx")
        else:
            diff = _write_bundle(loaded, tmp, channel_names, class_names)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = tuple(sorted(p for p in out.rglob("*") if p.is_file()))
    return ExportResult(out_dir=out, files=files, max_abs_diff=diff)
