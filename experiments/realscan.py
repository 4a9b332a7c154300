"""Real scans of people no site derives from, a classical reference, and a model's score on them.

**The scan.** Debian's ``mricron-data`` package (``apt-get install mricron-data``; BSD-3-clause,
the MRIcron distribution) ships ``/usr/share/mricron/templates/ch2bet.nii.gz``: the "Colin 27"
single-subject T1 (CH2: one adult male, 27 averaged 1 mm scans, Holmes et al., J Comput Assist Tomogr
1998), brain-extracted, 181 x 217 x 181 at 1 mm. It is one real person's brain, not a population
average, and not part of the MNI152 2009a template the sites are drawn from (docs/data.md). More
scans can be named with ``FEDSEG_REAL_SCANS=/path/a.nii.gz:/path/b.nii.gz`` (skull-stripped T1).

**The reference** (:func:`reference_segmentation`): the scan is skull-stripped, so the brain mask
is its nonzero voxels (largest connected component, holes filled); inside it a 3-class Gaussian
mixture of intensities (scikit-learn, fixed seed) labels CSF (darkest), GM, WM (brightest). Its
limits: intensity alone cannot tell deep grey nuclei from white matter where their T1 contrast is
low, vessels and dura left by the brain extraction count as tissue, and partial-volume voxels at
every GM/CSF border go to whichever class is nearer. A perfect anatomical segmentation would
disagree with it there, so it is a calibration bar, not ground truth (docs/data.md gives numbers).

**The model's prediction** (:func:`segment_scan`): the scan is resampled in world space onto the
model's grid (its training spacing, ``img_size`` voxels around the brain), z-scored over nonzero
voxels as the sites do, segmented, and the class probabilities are mapped back to the scan's
native 1 mm grid, where it is scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from client_agent.spacing import from_model_grid, image_on_grid, load_scan

__all__ = [
    "RealScan",
    "DEFAULT_SCANS",
    "available_real_scans",
    "missing_scan_hint",
    "reference_segmentation",
    "segment_scan",
    "score_segmentation",
    "save_figure",
    "evaluate_on_real_scans",
    "CLASS_NAMES",
    "grid_ceiling",
]

CLASS_NAMES = {1: "CSF", 2: "GM", 3: "WM"}


@dataclass(frozen=True)
class RealScan:
    """A real scan: its short name, file, where it comes from and under which licence."""

    name: str
    path: Path
    origin: str
    licence: str


DEFAULT_SCANS: tuple[RealScan, ...] = (
    RealScan(
        name="colin27",
        path=Path("/usr/share/mricron/templates/ch2bet.nii.gz"),
        origin="Debian package mricron-data: ch2bet.nii.gz, the Colin 27 single-subject T1 (one adult, "
               "27 averaged 1 mm scans), brain-extracted",
        licence="BSD-3-clause (MRIcron, Debian main); the CH2 image is distributed with MRIcron",
    ),
)


def available_real_scans() -> list[RealScan]:
    """The installed real scans: the defaults that exist plus those in ``FEDSEG_REAL_SCANS``."""
    scans = [s for s in DEFAULT_SCANS if s.path.is_file()]
    for entry in filter(None, os.environ.get("FEDSEG_REAL_SCANS", "").split(os.pathsep)):
        path = Path(entry)
        if not path.is_file():
            raise FileNotFoundError(f"FEDSEG_REAL_SCANS names {path}, which is not a file")
        scans.append(RealScan(name=path.name.split(".")[0], path=path, origin="FEDSEG_REAL_SCANS", licence="user's"))
    return scans


def missing_scan_hint() -> str:
    return ("no real scan installed: `apt-get install mricron-data` (Debian) provides the Colin 27 T1, or set "
            "FEDSEG_REAL_SCANS to skull-stripped T1 NIfTI files")


def reference_segmentation(image: np.ndarray, *, name: str = "scan", seed: int = 0) -> np.ndarray:
    """The classical reference: 0 background, 1 CSF, 2 GM, 3 WM (see the module docstring).

    ``image`` must be a skull-stripped T1 (zero outside the brain); a scan whose nonzero voxels
    fill most of its box is refused, because then the nonzero voxels are not a brain mask.
    """
    from sklearn.mixture import GaussianMixture

    nonzero = image > 0
    if nonzero.mean() > 0.6:
        raise ValueError(f"{name}: {nonzero.mean():.0%} of the voxels are nonzero; the reference needs a "
                         "skull-stripped scan (zero outside the brain)")
    components, count = ndimage.label(nonzero)
    if count == 0:
        raise ValueError(f"{name}: no nonzero voxels; nothing to segment")
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    brain = ndimage.binary_fill_holes(components == largest)
    values = image[brain].reshape(-1, 1).astype(np.float64)
    means = np.percentile(values, [10, 50, 90]).reshape(3, 1)
    gmm = GaussianMixture(3, covariance_type="full", means_init=means, random_state=seed, max_iter=200)
    # Fitted on a fixed random subset of 200k voxels (the class means to sampling error), applied to all.
    subset = np.random.default_rng(seed).choice(values.shape[0], size=min(values.shape[0], 200_000), replace=False)
    classes = gmm.fit(values[np.sort(subset)]).predict(values)
    rank = np.argsort(np.argsort(gmm.means_[:, 0]))  # 0 darkest ... 2 brightest
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[brain] = (rank[classes] + 1).astype(np.uint8)
    return labels


def segment_scan(net: Any, image: np.ndarray, affine: np.ndarray, *, spacing_mm: float,
                 size: Sequence[int], roi_size: Sequence[int] | None = None) -> np.ndarray:
    """A ``uint8`` class map of ``image`` on its own grid from ``net`` trained at ``spacing_mm``
    (on ``roi_size`` windows, ``[model] patch_size``, when given: predicted window by window)."""
    import torch

    from model import window_logits

    normalized, grid = image_on_grid(image, affine, spacing_mm=spacing_mm, size=size, normalize="nonzero")
    x = torch.from_numpy(normalized)[None]
    device = next(net.parameters()).device
    net.eval()
    with torch.no_grad():
        probs = torch.softmax(window_logits(net, x.to(device), roi_size).float(), dim=1)[0].cpu().numpy()
    return from_model_grid(probs, grid, shape=image.shape, affine=affine)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def score_segmentation(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Brain-mask Dice, Dice per tissue (CSF, GM, WM) and the GM/WM mean."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    scores = {"brain": _dice(prediction > 0, reference > 0)}
    for value, name in CLASS_NAMES.items():
        scores[name] = _dice(prediction == value, reference == value)
    scores["GM_WM_mean"] = (scores["GM"] + scores["WM"]) / 2.0
    return scores


def save_figure(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray, path: Path, title: str) -> Path:
    """Image / prediction / reference through the brain's centre in three planes (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["black", "#3b82f6", "#9ca3af", "#f5f5f5"])
    centre = [int(round(c)) for c in ndimage.center_of_mass(reference > 0)]
    # Sagittal through one hemisphere: the midline plane is mostly falx and fissure.
    extent = np.flatnonzero((reference > 0).any(axis=(1, 2)))
    if extent.size:
        centre[0] = int(min(max(centre[0] + (extent[-1] - extent[0]) // 5, 0), reference.shape[0] - 1))
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for col, axis in enumerate((2, 1, 0)):  # axial, coronal, sagittal (RAS: x, y, z)
        index: list[Any] = [slice(None)] * 3
        index[axis] = centre[axis]
        for row, (volume, name) in enumerate(((image, "image"), (prediction, "prediction"), (reference, "reference"))):
            ax = axes[row, col]
            plane = np.rot90(volume[tuple(index)])
            if row == 0:
                ax.imshow(plane, cmap="gray")
            else:
                ax.imshow(plane, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(name, loc="left", fontsize=9)
    fig.suptitle(title + "\nlabels: blue CSF, grey GM, white WM", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate_on_real_scans(net: Any, *, spacing_mm: float, size: Sequence[int], figure_dir: Path | None = None,
                           tag: str = "model", scans: Sequence[RealScan] | None = None,
                           roi_size: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """Score ``net`` on every installed real scan; with ``figure_dir``, write ``<tag>-<scan>.png``.
    ``roi_size``: the network's window (``[model] patch_size``; None: whole volumes)."""
    results: dict[str, dict[str, float]] = {}
    for scan in available_real_scans() if scans is None else scans:
        image, affine = load_scan(scan.path)
        reference = _cached_reference(str(scan.path), image)
        prediction = segment_scan(net, image, affine, spacing_mm=spacing_mm, size=size, roi_size=roi_size)
        results[scan.name] = score_segmentation(prediction, reference)
        if figure_dir is not None:
            s = results[scan.name]
            save_figure(image, prediction, reference, figure_dir / f"{tag}-{scan.name}.png",
                        f"{tag} on {scan.name}: brain {s['brain']:.3f}, GM {s['GM']:.3f}, WM {s['WM']:.3f}, "
                        f"CSF {s['CSF']:.3f}")
    return results


_REFERENCES: dict[str, np.ndarray] = {}


def _cached_reference(key: str, image: np.ndarray) -> np.ndarray:
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_segmentation(image, name=key)
    return _REFERENCES[key]


def load_federation_model(model_path: Path, config: Any) -> Any:
    """The configured network with a global model file's tensors (``config``: a FederationConfig)."""
    import torch

    import codec
    from model import build_model

    m = config.model
    net = build_model(m.architecture, in_channels=m.in_channels, out_channels=m.out_channels, img_size=m.img_size,
                      **dict(m.options))
    arrays = codec.load_tensors(model_path)
    if set(arrays) != set(net.state_dict()):
        raise ValueError(f"{model_path}: its tensors differ from the configured {m.architecture}'s")
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return net


def summary_line(scores: Mapping[str, Mapping[str, float]]) -> str:
    """``colin27: brain 0.951, GM 0.712, WM 0.845, CSF 0.402`` for each scan."""
    return "; ".join(f"{name}: brain {s['brain']:.3f}, GM {s['GM']:.3f}, WM {s['WM']:.3f}, CSF {s['CSF']:.3f}"
                     for name, s in scores.items())


def calibrate_on_template() -> dict[str, float]:
    """The synth generator's template labels (1 mm) scored against this reference on the template T1.

    What a perfect template-trained model could score against the reference: the rest of the
    disagreement is the reference's (docs/data.md).
    """
    import nibabel as nib

    from experiments import sitedata, synth

    templates = synth.load_synth_templates(1.0)
    labels = np.where(templates.probs.sum(axis=0) >= 0.5, np.argmax(templates.probs, axis=0) + 1, 0).astype(np.uint8)
    template: Any = nib.load(str(sitedata._template_path("t1")))  # a NIfTI image (nibabel types the base class)
    t1 = np.asarray(template.dataobj, dtype=np.float32)
    return score_segmentation(labels, reference_segmentation(t1, name="MNI152 T1"))


def grid_ceiling(image: np.ndarray, affine: np.ndarray, *, spacing_mm: float, size: Sequence[int],
                 reference: np.ndarray | None = None) -> dict[str, float]:
    """The best score any model on a ``spacing_mm`` grid can reach against the reference.

    The reference itself, one-hot, is carried onto the model's grid exactly as a scan is (anti-aliased,
    trilinear) and back exactly as a prediction is (class probabilities trilinear, argmax), then
    scored against itself: what is lost is what the grid cannot hold (a grey-matter ribbon thinner
    than a voxel, partial volume at every border). A model's score is to be read against this bar.
    """
    from client_agent.spacing import anti_alias, grid_around, resample_to_grid

    labels = reference if reference is not None else reference_segmentation(image)
    grid = grid_around(image, affine, spacing_mm=spacing_mm, size=size)
    probs = np.stack([resample_to_grid(anti_alias((labels == c).astype(np.float32), affine, spacing_mm), affine, grid,
                                       order=1) for c in range(len(CLASS_NAMES) + 1)])
    return score_segmentation(from_model_grid(probs, grid, shape=image.shape, affine=affine), labels)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="real-scan reference checks")
    parser.add_argument("--calibrate", action="store_true", help="template labels vs the reference on the template")
    parser.add_argument("--ceiling", action="store_true",
                        help="each installed scan's reference carried onto a 4, 3 and 2 mm model grid and back")
    args = parser.parse_args()
    if args.calibrate:
        print(json.dumps(calibrate_on_template(), indent=1))
    if args.ceiling:
        for scan in available_real_scans():
            image, affine = load_scan(scan.path)
            reference = reference_segmentation(image, name=str(scan.path))
            for spacing, size in ((4.0, 48), (3.0, 64), (2.0, 96)):
                line = {"scan": scan.name, "spacing_mm": spacing, "size": size,
                        **grid_ceiling(image, affine, spacing_mm=spacing, size=[size] * 3, reference=reference)}
                print(json.dumps(line), flush=True)
