"""Site data that teaches tissue, not one brain: SynthSeg-style domain randomization from MNI152.

The scanner-profile generator (``sitedata.py``) images deformed copies of one brain with a few
fixed contrasts; a network trained on it learns that brain's shape and those contrasts, and fails
on a real scan of someone else. Following SynthSeg (Billot et al., Medical Image Analysis 2023),
this generator draws every case from the template's *label and probability maps* and randomizes
everything a network could otherwise memorise:

* **Geometry** (per case): an affine with rotation up to ``±20°`` about each axis, per-axis scaling
  in ``[0.8, 1.2]``, shear up to ``±0.08`` and translation up to ``±12 mm``, composed with a
  smooth nonlinear displacement (cubic spline through a 5^3 grid of Gaussian knots, ``σ`` = 3 mm,
  i.e. several millimetres of local stretch). Labels are the argmax of the *warped* probabilities.
* **Contrast**: each tissue class draws a mean and a spread from the site's ranges; the image is
  the partial-volume mix ``Σ_k P_k (μ_k + σ_k ε)`` of the warped probabilities, so any ordering of
  CSF / GM / WM (T1-like, T2-like, inverted, flat) can occur.
* **Scanner**: a smooth multiplicative bias field, a random acquisition resolution (Gaussian blur
  by the acquired voxel size, downsampling to it and trilinear upsampling back; one axis may be a
  thick slice), Gaussian noise, and a random gamma.

Images are skull-stripped (zero outside the brain), as the template is and as the real scans the
project evaluates on are. The output grid is ``size``^3 voxels at ``spacing_mm``: at 64^3 and 3 mm
(192 mm) the field of view holds the whole brain.

**Tissue classes.** The template's own CSF map, ``1 - P(GM) - P(WM)``, is almost empty at 1 mm,
while a scan's intensities show sulcal and ventricular fluid as dark (T1) voxels. CSF here is
defined *by intensity, as a scan shows it*: inside the brain mask (``fill_holes(T1 > 0)``) a
3-class Gaussian mixture of the template T1 gives each voxel a posterior of the darkest class;
that posterior is ``P(CSF)``, and the remaining ``1 - P(CSF)`` is split between GM and WM in the
ratio of the template's own GM and WM probabilities. Labels: 0 background, 1 CSF, 2 GM, 3 WM.
This is the same definition as the classical reference segmentation the project scores real scans
against (``experiments/realscan.py``), so CSF is a meaningful class there too.

**Sites** stay non-IID through their randomization ranges (:data:`SYNTH_SITES`): a T1-like site,
a T2-like site, and a low-resolution thick-slice site with any contrast; further sites cycle
through them with wider ranges. The held-out set (``test/``) draws from the union of all ranges
(:data:`HELDOUT_RANGES`) with its own random streams.

Seeded and deterministic: case ``i`` of site ``k`` depends only on ``(seed, k, i)`` and the
parameters. Output layout and manifest are those of ``sitedata.generate_federation`` (MSD layout,
``dataset.json`` with a ``fedseg`` block naming the generator and the site's ranges).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from experiments import sitedata
from experiments.sitedata import FederationData, TISSUE_LABELS

__all__ = [
    "SynthRanges",
    "SYNTH_SITES",
    "HELDOUT_RANGES",
    "SynthTemplates",
    "load_synth_templates",
    "intensity_csf_posterior",
    "make_synth_case",
    "generate_synth_federation",
    "GENERATOR_VERSION",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
_MIN_SPACING_MM, _MAX_SPACING_MM = 1.0, 6.0
_MAX_ROTATION_DEG = 20.0
_SCALE_RANGE = (0.8, 1.2)
_MAX_SHEAR = 0.08
_MAX_TRANSLATION_MM = 12.0
_DISPLACEMENT_STD_MM = 3.0
_DISPLACEMENT_KNOTS = 5
_BIAS_KNOTS = 4


@dataclass(frozen=True)
class SynthRanges:
    """One site's randomization ranges; every pair is ``(low, high)`` of a uniform draw.

    Attributes:
        csf_mean, gm_mean, wm_mean: tissue means on a [0, 1] scale.
        tissue_std: spread of every tissue's intensities (its own draw per tissue).
        acquired_mm: in-plane acquired voxel size in mm (>= the output spacing means blur).
        slice_mm: acquired thickness along one random axis, in mm.
        bias: amplitude ``b`` of the bias field ``exp(b * f)``, ``f`` smooth in [-1, 1].
        noise: standard deviation of Gaussian noise, on the [0, 1] scale.
        log_gamma: natural log of the gamma exponent applied after normalising to [0, 1].
    """

    csf_mean: tuple[float, float] = (0.0, 1.0)
    gm_mean: tuple[float, float] = (0.0, 1.0)
    wm_mean: tuple[float, float] = (0.0, 1.0)
    tissue_std: tuple[float, float] = (0.0, 0.08)
    acquired_mm: tuple[float, float] = (1.0, 3.0)
    slice_mm: tuple[float, float] = (1.0, 4.0)
    bias: tuple[float, float] = (0.0, 0.5)
    noise: tuple[float, float] = (0.0, 0.05)
    log_gamma: tuple[float, float] = (-0.3, 0.3)

    def __post_init__(self) -> None:
        for name, (low, high) in asdict(self).items():
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"SynthRanges.{name} must be finite (low, high) with low <= high, got {(low, high)}")
        for name in ("csf_mean", "gm_mean", "wm_mean"):
            low, high = getattr(self, name)
            if low < 0 or high > 1:
                raise ValueError(f"SynthRanges.{name} must lie in [0, 1], got {(low, high)}")
        for name in ("tissue_std", "bias", "noise"):
            if getattr(self, name)[0] < 0:
                raise ValueError(f"SynthRanges.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("acquired_mm", "slice_mm"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"SynthRanges.{name} must be > 0 mm, got {getattr(self, name)}")


SYNTH_SITES: tuple[tuple[str, SynthRanges], ...] = (
    # T1-like: CSF dark, grey matter between, white matter bright; near-isotropic 1-3 mm.
    ("T1-like", SynthRanges(csf_mean=(0.0, 0.35), gm_mean=(0.35, 0.65), wm_mean=(0.6, 1.0))),
    # T2-like: the order inverted (CSF bright, white matter darkest).
    ("T2-like", SynthRanges(csf_mean=(0.65, 1.0), gm_mean=(0.35, 0.65), wm_mean=(0.0, 0.4))),
    # A 2D clinical protocol: any contrast, thick slices (4-8 mm) and coarse in-plane voxels.
    ("thick-slice, any contrast", SynthRanges(acquired_mm=(2.0, 4.0), slice_mm=(4.0, 8.0), noise=(0.0, 0.08))),
)
# The held-out set: every contrast and resolution the sites see together, drawn independently.
HELDOUT_RANGES = SynthRanges(acquired_mm=(1.0, 4.0), slice_mm=(1.0, 6.0))


def _site_ranges(index: int) -> tuple[str, SynthRanges]:
    """Site ``index`` (0-based): the three archetypes, then again with any contrast."""
    name, ranges = SYNTH_SITES[index % len(SYNTH_SITES)]
    if index < len(SYNTH_SITES):
        return name, ranges
    return f"{name} (any contrast)", SynthRanges(acquired_mm=ranges.acquired_mm, slice_mm=ranges.slice_mm,
                                                 noise=ranges.noise)


# --------------------------------------------------------------------------------------------------
# Template maps


@dataclass(frozen=True)
class SynthTemplates:
    """The template's tissue probabilities at one isotropic spacing (read-only arrays).

    Attributes:
        probs: ``(3, X, Y, Z)`` float32 P(CSF), P(GM), P(WM); they sum to the soft brain mask.
        affine: voxel-to-MNI-mm affine.
        spacing_mm: isotropic spacing of the maps.
        centre_mm: the brain's centre of mass in MNI mm.
    """

    probs: np.ndarray
    affine: np.ndarray
    spacing_mm: float
    centre_mm: tuple[float, float, float]


def intensity_csf_posterior(t1: np.ndarray, brain: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """P(darkest class) of a 3-class Gaussian mixture of ``t1`` inside ``brain`` (0 outside).

    The same mixture the real-scan reference uses, so "CSF" means the same thing in the sites'
    labels and in the reference: fluid as a T1 scan shows it (dark), not the template's
    probabilistic residue.
    """
    from sklearn.mixture import GaussianMixture

    values = t1[brain].reshape(-1, 1).astype(np.float64)
    if values.size < 30:
        raise ValueError(f"the brain mask holds {values.size} voxels; a 3-class mixture needs at least 30")
    means = np.percentile(values, [10, 50, 90]).reshape(3, 1)
    gmm = GaussianMixture(3, covariance_type="full", means_init=means, random_state=seed, max_iter=200)
    gmm.fit(values)
    darkest = int(np.argmin(gmm.means_[:, 0]))
    posterior = np.zeros(t1.shape, dtype=np.float32)
    posterior[brain] = gmm.predict_proba(values)[:, darkest].astype(np.float32)
    return posterior


@functools.lru_cache(maxsize=2)
def _load_cached(spacing_mm: float) -> SynthTemplates:
    images = {key: nib.Nifti1Image.from_filename(sitedata._template_path(key)) for key in ("t1", "gm", "wm")}
    affine_1mm = images["t1"].affine
    raw = {key: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for key, img in images.items()}
    brain = sitedata._fill_holes(raw["t1"] > 0)
    # The mixture is fitted at 2 mm (an eighth of the voxels, the same class means) and its
    # posterior upsampled; at 1 mm the fit alone costs seconds per process.
    t1_2 = sitedata._downsample(raw["t1"], 2.0)
    brain_2 = sitedata._downsample(brain.astype(np.float32), 2.0) >= 0.5
    csf_2 = intensity_csf_posterior(t1_2, brain_2)
    csf = ndimage.zoom(csf_2, np.asarray(raw["t1"].shape) / np.asarray(csf_2.shape), order=1, grid_mode=True,
                       mode="nearest")
    csf = np.clip(csf, 0.0, 1.0) * brain
    gm, wm = raw["gm"] * brain, raw["wm"] * brain
    tissue = gm + wm
    # Inside the mask where the template gives no tissue at all, what is not CSF is split evenly.
    share_gm = np.where(tissue > 1e-3, gm / np.maximum(tissue, 1e-3), 0.5)
    rest = (1.0 - csf) * brain
    probs_1mm = (csf, rest * share_gm, rest * (1.0 - share_gm))
    s = spacing_mm
    probs = np.stack([np.clip(sitedata._downsample(p.astype(np.float32), s), 0.0, 1.0) for p in probs_1mm])
    step = np.diag([s, s, s, 1.0])
    step[:3, 3] = (s - 1.0) / 2.0
    affine = affine_1mm @ step
    centre_vox = np.asarray(ndimage.center_of_mass(brain))
    centre_mm = affine_1mm[:3, :3] @ centre_vox + affine_1mm[:3, 3]
    probs.setflags(write=False)
    affine.setflags(write=False)
    return SynthTemplates(probs=probs, affine=affine, spacing_mm=s,
                          centre_mm=(float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2])))


def load_synth_templates(spacing_mm: float = 2.0) -> SynthTemplates:
    """The template's CSF / GM / WM probabilities at 1 or 2 mm (cached in-process)."""
    if spacing_mm not in (1.0, 2.0):
        raise ValueError(f"the synth templates are kept at 1 or 2 mm, got {spacing_mm!r}")
    return _load_cached(float(spacing_mm))


# --------------------------------------------------------------------------------------------------
# One case


def _rotation(rng: np.random.Generator) -> np.ndarray:
    out = np.eye(3)
    for axis in range(3):
        angle = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        c, s = np.cos(angle), np.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


def _grid_to_template(rng: np.random.Generator, templates: SynthTemplates, size: int,
                      spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Template voxel coordinates ``(3, size, size, size)`` of every output voxel, and the output affine."""
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR, 3)
    linear = _rotation(rng) @ shear @ np.diag(rng.uniform(*_SCALE_RANGE, size=3))
    centre = np.asarray(templates.centre_mm) + rng.uniform(-_MAX_TRANSLATION_MM, _MAX_TRANSLATION_MM, 3)
    half = (size - 1) / 2.0
    offsets_mm = (np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) - np.float32(half)) * np.float32(spacing_mm)
    mm = np.einsum("ij,jn->in", linear.astype(np.float32), offsets_mm).reshape(3, size, size, size)
    for axis in range(3):
        knots = rng.normal(0.0, _DISPLACEMENT_STD_MM, size=(_DISPLACEMENT_KNOTS,) * 3)
        mm[axis] += sitedata.upsample_knots(knots, (size,) * 3)
    mm += centre.astype(np.float32)[:, None, None, None]
    inverse = np.linalg.inv(templates.affine)
    vox = np.einsum("ij,jxyz->ixyz", inverse[:3, :3].astype(np.float32), mm)
    vox += inverse[:3, 3].astype(np.float32)[:, None, None, None]
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = centre - half * spacing_mm
    return vox, affine


def _degrade_resolution(image: np.ndarray, rng: np.random.Generator, ranges: SynthRanges,
                        spacing_mm: float) -> np.ndarray:
    """Blur to a random acquired voxel size (one axis possibly a thick slice), resample down and up."""
    acquired = np.full(3, rng.uniform(*ranges.acquired_mm))
    acquired[rng.integers(3)] = max(acquired[0], rng.uniform(*ranges.slice_mm))
    factor = np.maximum(acquired / spacing_mm, 1.0)
    if np.all(factor <= 1.05):
        return image
    # The standard deviation of a box of width f voxels is f / sqrt(12); SynthSeg uses ~0.4 f.
    sigma = np.where(factor > 1.05, 0.4 * factor, 0.0)
    blurred = ndimage.gaussian_filter(image, sigma, mode="constant")
    coarse_shape = np.maximum(np.round(np.asarray(image.shape) / factor).astype(int), 2)
    coarse = ndimage.zoom(blurred, coarse_shape / np.asarray(image.shape), order=1, grid_mode=True, mode="nearest")
    back = ndimage.zoom(coarse, np.asarray(image.shape) / np.asarray(coarse.shape), order=1, grid_mode=True,
                        mode="nearest")
    return back[: image.shape[0], : image.shape[1], : image.shape[2]].astype(np.float32)


def make_synth_case(
    templates: SynthTemplates,
    *,
    size: int,
    spacing_mm: float,
    ranges: SynthRanges,
    anatomy_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One randomized case.

    Returns:
        ``image`` ``(size,)*3`` float32 in [0, 1] inside the brain and 0 outside, ``label``
        ``(size,)*3`` uint8 in {0 background, 1 CSF, 2 GM, 3 WM}, and the ``(4, 4)`` affine.
    """
    coords, affine = _grid_to_template(anatomy_rng, templates, size, spacing_mm)
    probs = np.stack([sitedata.sample_volume(p, coords, order=1) for p in templates.probs])
    brain_soft = probs.sum(axis=0)
    brain = brain_soft >= 0.5
    label = np.where(brain, np.argmax(probs, axis=0) + 1, 0).astype(np.uint8)

    rng = scanner_rng
    means = np.array([rng.uniform(*ranges.csf_mean), rng.uniform(*ranges.gm_mean), rng.uniform(*ranges.wm_mean)])
    stds = rng.uniform(*ranges.tissue_std, size=3)
    weights = probs / np.maximum(brain_soft, 1e-6)
    clean = np.einsum("k,kxyz->xyz", means.astype(np.float32), weights)
    spread = np.einsum("k,kxyz->xyz", stds.astype(np.float32), weights)
    image = clean + spread * rng.standard_normal(clean.shape).astype(np.float32)
    # Partial volume with the (dark) background at the brain's edge, as a stripped scan shows it.
    image = image * np.clip(brain_soft, 0.0, 1.0)
    image = _degrade_resolution(image.astype(np.float32), rng, ranges, spacing_mm)
    image = image * np.exp(rng.uniform(*ranges.bias) * sitedata.smooth_random_field(rng, image.shape, _BIAS_KNOTS))
    image = image + rng.uniform(*ranges.noise) * rng.standard_normal(image.shape).astype(np.float32)
    inside = image[brain]
    low, high = (float(np.percentile(inside, 0.5)), float(np.percentile(inside, 99.5))) if inside.size else (0.0, 1.0)
    image = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    image = np.power(image, np.exp(rng.uniform(*ranges.log_gamma)))
    # Skull-stripped: exactly zero outside the brain; a tiny floor keeps dark tissue "nonzero"
    # for the sites' z-scoring over nonzero voxels.
    image = np.where(brain, np.maximum(image, 1e-3), 0.0).astype(np.float32)
    return image, label, affine


# --------------------------------------------------------------------------------------------------
# A federation


def _validate(sites: int, counts: Sequence[int] | int, test_cases: int, size: int, spacing_mm: float,
              seed: int) -> tuple[int, ...]:
    sitedata._check_generation_counts(sites=sites, test_cases=test_cases, size=size, seed=seed)
    if not (isinstance(spacing_mm, (int, float)) and _MIN_SPACING_MM <= spacing_mm <= _MAX_SPACING_MM):
        raise ValueError(f"spacing_mm must be in [{_MIN_SPACING_MM}, {_MAX_SPACING_MM}] mm, got {spacing_mm!r}")
    return sitedata._resolve_counts(sites, counts)


def _write_folder(folder: Path, *, name: str, stream: int, cases: int, ranges: SynthRanges, archetype: str,
                  templates: SynthTemplates, size: int, spacing_mm: float, seed: int) -> None:
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for index in range(cases):
        anatomy_rng, scanner_rng = sitedata._case_rngs(seed, stream, index)
        image, label, affine = make_synth_case(templates, size=size, spacing_mm=spacing_mm, ranges=ranges,
                                               anatomy_rng=anatomy_rng, scanner_rng=scanner_rng)
        case = f"{name}_{index:03d}.nii.gz"
        sitedata._save_nifti(folder / "imagesTr" / case, image, affine)
        sitedata._save_nifti(folder / "labelsTr" / case, label, affine)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    dataset = {
        "name": f"FedSegNet-synth-{name}",
        "description": f"Domain-randomized cases drawn from MNI152 tissue maps, site {name} ({archetype})",
        "reference": "ICBM 2009a nonlinear symmetric template (Fonov et al., NeuroImage 2011), via nilearn; "
                     "randomization after SynthSeg (Billot et al., Medical Image Analysis 2023)",
        "licence": "ICBM 2009a template licence (free use with attribution); generated derivatives",
        "release": f"experiments.synth v{GENERATOR_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "fedseg": {"site": name, "task": "tissue", "generator": "synth", "archetype": archetype, "seed": seed,
                   "size": size, "spacing_mm": spacing_mm, "ranges": asdict(ranges),
                   "label_note": "CSF = darkest class of a 3-class Gaussian mixture of the template T1 inside "
                                 "the brain mask; GM/WM share the rest by the template's probabilities"},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


def generate_synth_federation(
    out_dir: Path,
    *,
    sites: int = 3,
    cases_per_site: Sequence[int] | int = (6, 4, 8),
    test_cases: int = 4,
    size: int = 64,
    spacing_mm: float = 3.0,
    seed: int = 0,
) -> FederationData:
    """Write ``out_dir/site-1 ... site-N`` and ``out_dir/test`` (MSD layout) of randomized cases.

    Same contract as :func:`experiments.sitedata.generate_federation`: reproducible, reused when
    ``out_dir`` already holds the same generation, replaced when it holds another of ours, refused
    when it holds anything else; built beside ``out_dir`` and renamed into place.
    """
    counts = _validate(sites, cases_per_site, test_cases, size, spacing_mm, seed)
    out_dir = Path(out_dir)
    names = [f"site-{k + 1}" for k in range(sites)]
    archetypes = [_site_ranges(k) for k in range(sites)]
    params: dict[str, Any] = {
        "generator": "synth", "generator_version": GENERATOR_VERSION, "seed": seed, "size": size,
        "spacing_mm": float(spacing_mm), "cases_per_site": list(counts), "test_cases": test_cases,
        "ranges": [asdict(r) for _, r in archetypes], "heldout_ranges": asdict(HELDOUT_RANGES),
    }
    params = json.loads(json.dumps(params))  # as the manifest reads back (tuples become lists)
    data = FederationData(site_dirs=tuple(out_dir / n for n in names), test_dir=out_dir / "test", size=size,
                          spacing_mm=float(spacing_mm), num_classes=len(TISSUE_LABELS), in_channels=1)
    if sitedata._manifest_matches(out_dir, params):
        log.info("reusing the federation already in %s", out_dir)
        return data
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / sitedata.MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no {sitedata.MANIFEST_NAME}; refusing to overwrite "
                              f"it - choose an empty or new folder")
    templates = load_synth_templates(2.0 if spacing_mm >= 2.0 else 1.0)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        jobs = [(n, k + 1, c, r, a) for k, (n, c, (a, r)) in enumerate(zip(names, counts, archetypes))]
        jobs.append(("test", 0, test_cases, HELDOUT_RANGES, "held-out: every range"))
        files: list[str] = []
        for name, stream, count, ranges, archetype in jobs:
            _write_folder(staging / name, name=name, stream=stream, cases=count, ranges=ranges, archetype=archetype,
                          templates=templates, size=size, spacing_mm=float(spacing_mm), seed=seed)
            files += [str(p.relative_to(staging)) for p in sorted((staging / name).rglob("*")) if p.is_file()]
        (staging / sitedata.MANIFEST_NAME).write_text(json.dumps({"params": params, "files": files}, indent=2) + "\n")
        sitedata._move_into_place(staging, out_dir, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data
