"""Federation site data from real anatomy: nilearn's MNI152 2009a template, made into many scans.

Source volumes (installed with nilearn, read offline, never fetched): the ICBM 2009a nonlinear
symmetric T1 and its grey- and white-matter probability maps at 1 mm (197 x 233 x 189, RAS).

**Tissue labels.** The template T1 is skull-stripped by its authors (zero outside the brain), so the
brain mask is ``fill_holes(T1 > 0)``. Inside it the template gives P(GM) and P(WM); CSF is what is
left, ``P(CSF) = clip(1 - P(GM) - P(WM), 0, 1)`` (ventricles, sulci, cisterns: all brain-mask voxels
with little tissue). Each brain voxel takes the most probable of CSF (1), GM (2), WM (3); outside is
background (0). At a coarser spacing ``s`` the T1, the mask and the probabilities are low-passed and
resampled trilinearly onto the grid whose voxel ``i`` covers 1 mm voxels ``s*i ... s*i + s - 1``;
labels are the argmax of the *resampled* probabilities (rather than nearest-neighbour labels, which
at s = 2 would pick one of two equidistant voxels arbitrarily).

**Cases.** MNI152 is one subject, so each case is a different realistic variant of it: a random
rotation (up to 10 degrees about a random axis), per-axis scaling in [0.9, 1.1] and a smooth
displacement field (~2 mm), applied identically to image (trilinear) and labels (nearest), sampled
onto a ``size``-cubed grid placed around the brain's centre plus the site's field-of-view shift plus
a per-case jitter. Deformations run at the template spacing on the output grid only, so a 48^3 case
costs a few 100k-point ``map_coordinates`` calls.

**Sites** differ by a :class:`ScannerProfile`: tissue contrast (gamma, contrast, inversion), a
multiplicative smooth bias field, blur and thick slices (loss of resolution), Rician noise, and the
field-of-view placement, which changes class balance: at 48^3 / 2 mm a box centred on the brain
holds ~4% background, one shifted 28 mm up ~13% (air above the vertex) and less grey matter. CSF
stays near 6.5% wherever the box goes, because sulcal CSF lines the whole cortex. The held-out test
set uses :data:`HELDOUT_PROFILE`, whose gamma and contrast lie outside every default site's range.
Images are skull-stripped, as the template is (and as BraTS distributes its scans).

Output: one folder per site plus ``test/``, each in the Medical Segmentation Decathlon layout
(``dataset.json``, ``imagesTr/``, ``labelsTr/``), images float32, labels uint8, affines carrying
the voxel spacing. The held-out set's cases are listed under ``training`` too (with labels) because
they are meant for evaluation, which needs labels; MSD's ``test`` list (images only) stays empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = [
    "ScannerProfile",
    "DEFAULT_SITE_PROFILES",
    "HELDOUT_PROFILE",
    "FederationData",
    "Templates",
    "TISSUE_LABELS",
    "MANIFEST_NAME",
    "load_templates",
    "warp_coordinates",
    "upsample_knots",
    "smooth_random_field",
    "sample_volume",
    "apply_scanner_profile",
    "make_tissue_case",
    "generate_federation",
    "describe",
    "add_arguments",
    "run",
    "main_generate",
]

logger = logging.getLogger(__name__)

BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3
TISSUE_LABELS: dict[int, str] = {
    BACKGROUND: "background",
    CSF: "CSF",
    GREY_MATTER: "grey matter",
    WHITE_MATTER: "white matter",
}
TASKS = ("tissue", "brats")
MANIFEST_NAME = "fedseg-sitedata.json"
# Bump when the generated arrays for the same parameters change, so that old folders are rebuilt.
GENERATOR_VERSION = 1

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MIN_SPACING_MM, _MAX_SPACING_MM = 1.0, 4.0
# Geometry of a case's random variant (see the module docstring).
_MAX_ROTATION_DEG = 10.0
_SCALE_RANGE = (0.9, 1.1)
_DISPLACEMENT_STD_MM = 2.0
_DISPLACEMENT_CONTROL_MM = 24.0  # spacing of the displacement field's control points
_FOV_JITTER_MM = 5.0
_BIAS_CONTROL_POINTS = 4  # a bias field varies over ~1/3 of the field of view, like a coil's


# --------------------------------------------------------------------------------------------------
# Scanner profiles


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and protocol turn anatomy into an image.

    Effects are applied in acquisition order: tissue contrast (``gamma``, ``contrast``,
    ``invert``), coil bias field, loss of resolution (``blur_sigma``, ``slice_factor``), then noise.

    Attributes:
        bias_strength: amplitude of the multiplicative bias field ``exp(b * f)``, ``f`` a smooth
            random field in [-1, 1]; 0.3 means intensities vary by about x0.74 ... x1.35.
        noise_std: standard deviation of the Rician noise, in units of white-matter T1 (~0.86).
        blur_sigma: Gaussian blur in millimetres (0 = none).
        gamma: power applied to the normalised intensities (1 = none).
        contrast: gain around the mean brain intensity (1 = none, < 1 flattens tissue contrast).
        invert: replace the brain's intensities ``I`` by ``1 - I`` (a T2-like contrast: CSF bright,
            GM above WM), background stays dark.
        slice_factor: acquire every ``k`` slices along the superior axis as one thick slice and
            interpolate back (a 2D clinical protocol); 1 = isotropic.
        fov_shift_mm: the site's field-of-view centre relative to the brain's centre, in mm along
            (right, anterior, superior); a superior shift adds background above the vertex.
    """

    bias_strength: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    gamma: float = 1.0
    contrast: float = 1.0
    invert: bool = False
    slice_factor: int = 1
    fov_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("bias_strength", "noise_std", "blur_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.bias_strength > 2.0:
            raise ValueError(f"bias_strength must be <= 2 (a x7 intensity swing), got {self.bias_strength}")
        for name in ("gamma", "contrast"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 10):
                raise ValueError(f"{name} must be in (0, 10], got {value!r}")
        if not isinstance(self.invert, bool):
            raise ValueError(f"invert must be a bool, got {self.invert!r}")
        if isinstance(self.slice_factor, bool) or not isinstance(self.slice_factor, int) or not 1 <= self.slice_factor <= 8:
            raise ValueError(f"slice_factor must be an int in [1, 8], got {self.slice_factor!r}")
        shift = tuple(self.fov_shift_mm)
        if len(shift) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in shift):
            raise ValueError(f"fov_shift_mm must be three finite numbers (mm), got {self.fov_shift_mm!r}")
        # Normalise lists (e.g. from JSON) to a tuple of floats so that equal profiles compare equal.
        object.__setattr__(self, "fov_shift_mm", tuple(float(v) for v in shift))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["fov_shift_mm"] = list(self.fov_shift_mm)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScannerProfile:
        """Build a profile from :meth:`to_dict`'s output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ScannerProfile fields {unknown}; allowed: {sorted(known)}")
        values = dict(data)
        if "fov_shift_mm" in values:
            values["fov_shift_mm"] = tuple(values["fov_shift_mm"])
        return cls(**values)


DEFAULT_SITE_PROFILES: tuple[ScannerProfile, ...] = (
    # site-1: a recent 3 T scanner, clean images, field of view centred on the brain.
    ScannerProfile(bias_strength=0.15, noise_std=0.02),
    # site-2: an older 1.5 T scanner: stronger bias, noisier, softer, flatter contrast; its
    # protocol centres the field of view high (air above the vertex, less grey matter).
    ScannerProfile(
        bias_strength=0.35, noise_std=0.05, blur_sigma=1.0, gamma=1.2, contrast=0.85,
        fov_shift_mm=(0.0, 0.0, 28.0),
    ),
    # site-3: a T2-like (inverted) contrast, centred low (temporal poles, brainstem, cerebellum).
    ScannerProfile(
        bias_strength=0.2, noise_std=0.03, blur_sigma=0.5, gamma=0.9, contrast=1.1, invert=True,
        fov_shift_mm=(0.0, 0.0, -12.0),
    ),
    # site-4: thick-slice 2D acquisition.
    ScannerProfile(bias_strength=0.25, noise_std=0.03, slice_factor=3, fov_shift_mm=(0.0, 8.0, 0.0)),
    # site-5: a much worse scanner: strong bias, heavy noise and blur, low contrast.
    ScannerProfile(
        bias_strength=0.6, noise_std=0.10, blur_sigma=1.5, gamma=1.3, contrast=0.6,
        fov_shift_mm=(0.0, -8.0, 4.0),
    ),
)
# Gamma below and contrast above every site's (0.9-1.3 and 0.6-1.1): an effect no site trained on.
HELDOUT_PROFILE = ScannerProfile(
    bias_strength=0.3, noise_std=0.04, blur_sigma=0.5, gamma=0.6, contrast=1.4, slice_factor=2
)


# --------------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Templates:
    """The MNI152 anatomy at one isotropic spacing (arrays are read-only; shared by a cache).

    Attributes:
        t1: ``(X, Y, Z)`` float32 T1, normalised to [0, 1] (white matter ~0.86, 0 outside the brain).
        probs: ``(3, X, Y, Z)`` float32 CSF, GM, WM probabilities (zero outside the brain).
        brain: ``(X, Y, Z)`` float32 soft brain mask in [0, 1].
        labels: ``(X, Y, Z)`` uint8 tissue labels (0 background, 1 CSF, 2 GM, 3 WM).
        affine: ``(4, 4)`` voxel-to-MNI-mm affine; its diagonal is the spacing.
        spacing_mm: isotropic voxel size in mm.
        centre_vox: the brain's centre of mass in voxel coordinates.
    """

    t1: np.ndarray
    probs: np.ndarray
    brain: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing_mm: float
    centre_vox: tuple[float, float, float]


def _nilearn_data_dir() -> Path:
    """nilearn's packaged data folder, found without importing nilearn.

    ``importlib.resources.files("nilearn.datasets")`` would import nilearn.datasets (sklearn,
    pandas: ~4 s on a loaded machine); the spec of the top-level package gives the same folder
    without executing anything. Nothing is fetched: these files ship inside the wheel.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return Path(str(importlib.resources.files("nilearn.datasets") / "data"))


def _template_path(key: str) -> Path:
    path = _nilearn_data_dir() / _TEMPLATE_FILES[key]
    if not path.is_file():
        raise FileNotFoundError(
            f"MNI152 template {path} not found; install nilearn>=0.10 (`pip install fedsegnet[experiments]`)"
        )
    return path


def _validate_spacing(spacing_mm: float) -> float:
    if not (isinstance(spacing_mm, (int, float)) and _MIN_SPACING_MM <= spacing_mm <= _MAX_SPACING_MM):
        raise ValueError(
            f"spacing_mm must be in [{_MIN_SPACING_MM}, {_MAX_SPACING_MM}] mm, got {spacing_mm!r}"
        )
    return float(spacing_mm)


def _downsample(volume: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Resample a 1 mm volume onto the ``spacing_mm`` grid (anti-aliased trilinear).

    Output voxel ``i`` is centred on 1 mm coordinate ``s*i + (s-1)/2``, so it covers 1 mm voxels
    ``s*i ... s*i + s - 1``; for s = 2 trilinear sampling there is exactly a 2x2x2 block mean.
    """
    s = spacing_mm
    shape = tuple(int(n // s) for n in volume.shape)
    if s == 1.0:
        return volume.astype(np.float32)
    if s != round(s) or s > 2:
        # Beyond a factor of 2, the 8-neighbour mean alone would alias; low-pass first.
        volume = ndimage.gaussian_filter(volume, sigma=(s - 1.0) / 2.0, mode="nearest")
    if s == 2.0:
        # Exact 2x2x2 block mean (the trilinear sample at the block centre), as three pairwise
        # sums: an order of magnitude cheaper than either affine_transform or a strided mean.
        out = volume[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]].astype(np.float32)
        out = out[0::2] + out[1::2]
        out = out[:, 0::2] + out[:, 1::2]
        out = out[:, :, 0::2] + out[:, :, 1::2]
        return out * np.float32(0.125)
    out = ndimage.affine_transform(
        volume, np.full(3, s), offset=(s - 1.0) / 2.0, output_shape=shape, order=1, mode="nearest"
    )
    return out.astype(np.float32)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every region of ``~mask`` that does not reach the volume's border.

    Same result as ``ndimage.binary_fill_holes`` (face connectivity) via one labelling pass,
    ~5x faster than its iterated erosion on the 1 mm template.
    """
    outside, _ = ndimage.label(~mask)
    border = np.unique(np.concatenate([
        outside[[0, -1]].ravel(), outside[:, [0, -1]].ravel(), outside[:, :, [0, -1]].ravel()
    ]))
    return ~np.isin(outside, border[border > 0])


@functools.lru_cache(maxsize=4)
def _load_templates_cached(spacing_mm: float) -> Templates:
    images = {key: nib.Nifti1Image.from_filename(_template_path(key)) for key in _TEMPLATE_FILES}
    affine_1mm = images["t1"].affine
    raw = {key: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for key, img in images.items()}
    brain_1mm = _fill_holes(raw["t1"] > 0).astype(np.float32)
    csf_1mm = np.clip(1.0 - raw["gm"] - raw["wm"], 0.0, 1.0) * brain_1mm
    # Probability maps extend slightly beyond the skull-stripped T1; the brain mask bounds them.
    gm_1mm, wm_1mm = raw["gm"] * brain_1mm, raw["wm"] * brain_1mm

    s = spacing_mm
    t1 = _downsample(raw["t1"], s)
    brain = np.clip(_downsample(brain_1mm, s), 0.0, 1.0)
    probs = np.stack([np.clip(_downsample(v, s), 0.0, 1.0) for v in (csf_1mm, gm_1mm, wm_1mm)])
    labels = np.where(brain >= 0.5, np.argmax(probs, axis=0) + 1, BACKGROUND).astype(np.uint8)

    step = np.diag([s, s, s, 1.0])
    step[:3, 3] = (s - 1.0) / 2.0
    affine = affine_1mm @ step
    centre = tuple(float(c) for c in ndimage.center_of_mass(labels > 0))
    for array in (t1, probs, brain, labels, affine):
        array.setflags(write=False)
    logger.debug("loaded MNI152 templates at %.2f mm: shape %s", s, t1.shape)
    return Templates(t1=t1, probs=probs, brain=brain, labels=labels, affine=affine, spacing_mm=s,
                     centre_vox=centre)  # type: ignore[arg-type]


def load_templates(spacing_mm: float = 2.0) -> Templates:
    """The MNI152 T1 and tissue maps at ``spacing_mm`` (1-4 mm), cached in-process."""
    return _load_templates_cached(_validate_spacing(spacing_mm))


# --------------------------------------------------------------------------------------------------
# Geometry of one case


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation by a uniform angle in [-max_deg, max_deg] about a uniformly random axis (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def warp_coordinates(
    rng: np.random.Generator, templates: Templates, size: int, fov_shift_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one random variant's geometry.

    Returns:
        ``coords``: ``(3, size, size, size)`` float32 template voxel coordinates of every output
        voxel (rotation, scaling and a smooth displacement about the field-of-view centre), and
        the output grid's ``(4, 4)`` affine: the template spacing, placed at the undeformed
        position of the field of view in MNI mm.
    """
    s = templates.spacing_mm
    shift_vox = (np.asarray(fov_shift_mm, dtype=np.float64) + rng.uniform(-_FOV_JITTER_MM, _FOV_JITTER_MM, 3)) / s
    centre = np.asarray(templates.centre_vox) + shift_vox
    linear = _random_rotation(rng, _MAX_ROTATION_DEG) @ np.diag(rng.uniform(*_SCALE_RANGE, size=3))

    half = (size - 1) / 2.0
    offsets = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) - np.float32(half)
    coords = np.einsum("ij,jn->in", linear.astype(np.float32), offsets).reshape(3, size, size, size)
    coords += centre.astype(np.float32)[:, None, None, None]

    control = max(3, int(round(size * s / _DISPLACEMENT_CONTROL_MM)) + 1)
    for axis in range(3):
        knots = rng.normal(0.0, _DISPLACEMENT_STD_MM / s, size=(control,) * 3)
        coords[axis] += upsample_knots(knots, (size,) * 3)

    affine = np.diag([s, s, s, 1.0])
    affine[:3, 3] = templates.affine[:3, :3] @ (centre - half) + templates.affine[:3, 3]
    return coords, affine


def sample_volume(volume: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` at ``coords`` (3, ...); outside the template is background (0)."""
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0,
                                   prefilter=False)


# --------------------------------------------------------------------------------------------------
# Smooth random fields (displacements, bias fields, lesion shapes)


@functools.lru_cache(maxsize=32)
def _cubic_upsampling_matrix(control: int, length: int) -> np.ndarray:
    """``(length, control)`` matrix ``W`` with ``W @ v == ndimage.zoom(v, length / control, order=3)``.

    Cubic-spline zoom is separable, so upsampling a small grid of knots axis by axis with these
    matrices equals a 3D ``zoom`` at a fraction of its cost (3D zoom of 5^3 knots to 48^3 takes
    ~60 ms, three small matrix products well under 1 ms).
    """
    basis = np.eye(control)
    columns = [ndimage.zoom(basis[i], length / control, order=3, mode="nearest") for i in range(control)]
    matrix = np.stack(columns, axis=1)
    matrix.setflags(write=False)
    return matrix


def upsample_knots(knots: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Cubic-spline upsampling of a 3D grid of knots ``(a, b, c)`` to ``shape`` (float32)."""
    wx, wy, wz = (_cubic_upsampling_matrix(k, n) for k, n in zip(knots.shape, shape))
    # One axis at a time with plain einsum (no BLAS): cheap, and its summation order does not
    # depend on BLAS threading, so labels sampled through these fields are reproducible.
    field = np.einsum("kc,abc->abk", wz, knots)
    field = np.einsum("jb,abk->ajk", wy, field)
    return np.einsum("ia,ajk->ijk", wx, field).astype(np.float32)


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], control: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: cubic upsampling of a ``control``-cubed Gaussian grid."""
    field = upsample_knots(rng.standard_normal((control,) * 3), shape)
    return field / max(float(np.abs(field).max()), 1e-6)


# --------------------------------------------------------------------------------------------------
# Scanner effects: each a small function on an (X, Y, Z) float32 volume


def _apply_tissue_contrast(image: np.ndarray, brain: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Gamma, inversion and contrast gain, inside the (soft) brain mask only."""
    out = np.power(np.clip(image, 0.0, None), profile.gamma)
    if profile.invert:
        out = brain * (1.0 - out) + (1.0 - brain) * out
    if profile.contrast != 1.0:
        weight = float(brain.sum())
        mean = float((out * brain).sum() / weight) if weight > 0 else 0.0
        out = brain * (mean + profile.contrast * (out - mean)) + (1.0 - brain) * out
    return np.clip(out, 0.0, None).astype(np.float32)


def _apply_thick_slices(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` slices along the last (superior) axis into one, interpolate back linearly."""
    if factor == 1:
        return image
    depth = image.shape[-1]
    blocks = -(-depth // factor)
    padded = np.pad(image, [(0, 0), (0, 0), (0, blocks * factor - depth)], mode="edge")
    thick = padded.reshape(*image.shape[:2], blocks, factor).mean(axis=-1)
    # Slice centres sit at factor*j + (factor-1)/2 in the fine grid.
    position = np.clip((np.arange(depth) - (factor - 1) / 2.0) / factor, 0.0, blocks - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, blocks - 1)
    frac = (position - low).astype(np.float32)
    return (thick[..., low] * (1.0 - frac) + thick[..., high] * frac).astype(np.float32)


def _apply_rician_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise on both channels (MR magnitude images)."""
    if std == 0:
        return image
    real = image + rng.normal(0.0, std, image.shape).astype(np.float32)
    imag = rng.normal(0.0, std, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def apply_scanner_profile(
    channels: np.ndarray,
    brain: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    spacing_mm: float,
) -> np.ndarray:
    """Turn clean anatomy into what ``profile``'s scanner would record.

    Args:
        channels: ``(C, X, Y, Z)`` clean intensities (normalised, white matter ~0.86 on T1).
        brain: ``(X, Y, Z)`` soft brain mask in [0, 1] (where tissue contrast changes apply).
        profile: the site's scanner.
        rng: source of the bias field and noise; one bias field is shared by all channels (same
            coil), noise is independent per channel.
        spacing_mm: voxel size, to express ``blur_sigma`` in voxels.

    Returns:
        ``(C, X, Y, Z)`` float32.
    """
    shape = channels.shape[1:]
    bias = np.exp(profile.bias_strength * smooth_random_field(rng, shape, _BIAS_CONTROL_POINTS))
    out = []
    for clean in channels:
        image = _apply_tissue_contrast(clean, brain, profile) * bias
        if profile.blur_sigma > 0:
            image = ndimage.gaussian_filter(image, profile.blur_sigma / spacing_mm, mode="nearest")
        image = _apply_thick_slices(image, profile.slice_factor)
        out.append(_apply_rician_noise(image, profile.noise_std, rng))
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Cases


def _case_rngs(seed: int, stream: int, case: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for a case's anatomy and its scanner, keyed by (seed, site, case).

    Keying by case index (rather than drawing cases in sequence) keeps case ``i`` of a site the
    same when other counts change; splitting anatomy from scanner lets the same anatomy be imaged
    by different profiles.
    """
    anatomy, scanner = np.random.SeedSequence([seed, stream, case]).spawn(2)
    return np.random.default_rng(anatomy), np.random.default_rng(scanner)


def make_tissue_case(
    templates: Templates,
    *,
    size: int,
    profile: ScannerProfile,
    anatomy_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tissue-segmentation case.

    Returns:
        ``image`` ``(size, size, size)`` float32, ``label`` ``(size, size, size)`` uint8 in
        {0, 1, 2, 3}, and the ``(4, 4)`` affine.
    """
    coords, affine = warp_coordinates(anatomy_rng, templates, size, profile.fov_shift_mm)
    label = sample_volume(templates.labels, coords, order=0).astype(np.uint8)
    t1 = sample_volume(templates.t1, coords, order=1)
    brain = sample_volume(templates.brain, coords, order=1)
    image = apply_scanner_profile(t1[None], brain, profile, scanner_rng, templates.spacing_mm)[0]
    return image, label, affine


_CaseMaker = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _TaskSpec:
    make_case: _CaseMaker
    labels: dict[int, str]
    modalities: tuple[str, ...]
    label_note: str


def _task_spec(task: str) -> _TaskSpec:
    """The case maker and label/modality names of ``task``."""
    if task == "tissue":
        return _TaskSpec(
            make_case=make_tissue_case,
            labels=TISSUE_LABELS,
            modalities=("T1",),
            label_note=(
                "CSF = brain mask (filled T1 > 0) minus the GM/WM probabilities; "
                "label = argmax of CSF, GM, WM inside the mask"
            ),
        )
    if task == "brats":
        # Imported here because brats_like builds on this module's geometry and scanner effects.
        from experiments import brats_like

        return _TaskSpec(
            make_case=brats_like.make_brats_case,
            labels=brats_like.BRATS_LABELS,
            modalities=brats_like.MODALITIES,
            label_note=(
                "original BraTS label values 0, 1, 2, 4 (4 = enhancing, there is no 3); MSD Task01 "
                "renumbers them; images are 4D with channels last (T1, T1ce, T2, FLAIR)"
            ),
        )
    raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")


# --------------------------------------------------------------------------------------------------
# Writing a federation


@dataclass(frozen=True)
class FederationData:
    """Where a generated federation lives and what a model needs to know about it.

    Attributes:
        site_dirs: one MSD-layout folder per site, ``site-1`` ... ``site-N``.
        test_dir: the held-out MSD-layout folder (a scanner effect no site saw).
        size: every case is ``size`` voxels along each axis.
        spacing_mm: isotropic voxel size.
        num_classes: number of label values, background included (4 for both tasks; BraTS uses
            the values 0, 1, 2, 4, see each ``dataset.json``).
        in_channels: image channels (1 for tissue, 4 for brats).
    """

    site_dirs: tuple[Path, ...]
    test_dir: Path
    size: int
    spacing_mm: float
    num_classes: int
    in_channels: int


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _write_site(
    folder: Path,
    *,
    name: str,
    stream: int,
    cases: int,
    task: str,
    profile: ScannerProfile,
    templates: Templates,
    size: int,
    seed: int,
) -> None:
    spec = _task_spec(task)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for index in range(cases):
        anatomy_rng, scanner_rng = _case_rngs(seed, stream, index)
        image, label, affine = spec.make_case(
            templates, size=size, profile=profile, anatomy_rng=anatomy_rng, scanner_rng=scanner_rng
        )
        case = f"{name}_{index:03d}.nii.gz"
        _save_nifti(folder / "imagesTr" / case, image.astype(np.float32), affine)
        _save_nifti(folder / "labelsTr" / case, label.astype(np.uint8), affine)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    dataset = {
        "name": f"FedSegNet-{task}-{name}",
        "description": f"Deformed MNI152 2009a variants imaged by site profile {name} (generated)",
        "reference": "ICBM 2009a nonlinear symmetric template (Fonov et al., NeuroImage 2011), via nilearn",
        "licence": "ICBM 2009a template licence (free use with attribution); generated derivatives",
        "release": f"experiments.sitedata v{GENERATOR_VERSION}",
        "tensorImageSize": "3D" if len(spec.modalities) == 1 else "4D",
        "modality": {str(i): m for i, m in enumerate(spec.modalities)},
        "labels": {str(k): v for k, v in spec.labels.items()},
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "fedseg": {
            "site": name,
            "task": task,
            "seed": seed,
            "size": size,
            "spacing_mm": templates.spacing_mm,
            "profile": profile.to_dict(),
            "label_note": spec.label_note,
        },
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


def _resolve_counts(sites: int, cases_per_site: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(cases_per_site, int):
        counts: tuple[int, ...] = (cases_per_site,) * sites
    else:
        counts = tuple(cases_per_site)
        if len(counts) != sites:
            raise ValueError(
                f"cases_per_site has {len(counts)} entries but sites={sites}; "
                f"pass one count per site or a single int"
            )
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ValueError(f"every site needs at least one case, got cases_per_site={cases_per_site!r}")
    return counts


def _resolve_profiles(sites: int, profiles: Sequence[ScannerProfile] | None) -> tuple[ScannerProfile, ...]:
    if profiles is None:
        if sites > len(DEFAULT_SITE_PROFILES):
            raise ValueError(
                f"sites={sites} but only {len(DEFAULT_SITE_PROFILES)} default profiles exist; "
                f"pass profiles= with one ScannerProfile per site"
            )
        return DEFAULT_SITE_PROFILES[:sites]
    chosen = tuple(profiles)
    if len(chosen) != sites:
        raise ValueError(f"profiles has {len(chosen)} entries but sites={sites}")
    if not all(isinstance(p, ScannerProfile) for p in chosen):
        raise ValueError("profiles must be ScannerProfile instances")
    return chosen


def _manifest_matches(out_dir: Path, params: dict[str, Any]) -> bool:
    path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    return all((out_dir / rel).is_file() for rel in manifest.get("files", []))


def generate_federation(
    out_dir: Path,
    *,
    sites: int = 3,
    cases_per_site: Sequence[int] | int = (6, 4, 8),
    test_cases: int = 4,
    size: int = 48,
    spacing_mm: float = 2.0,
    seed: int = 0,
    task: str = "tissue",
    profiles: Sequence[ScannerProfile] | None = None,
) -> FederationData:
    """Write a federation's site folders and a held-out test folder under ``out_dir``.

    Layout: ``out_dir/site-1`` ... ``out_dir/site-N`` (profiles[k] for site k+1) and ``out_dir/test``
    (:data:`HELDOUT_PROFILE`), each in MSD layout, plus a manifest of the parameters.

    Reproducible: case ``i`` of site ``k`` depends only on ``(seed, k, i)``, the profile, ``size``,
    ``spacing_mm`` and ``task``, so the same call writes identical arrays. Idempotent: when
    ``out_dir`` already holds a generation with the same parameters it is reused untouched; one
    with other parameters is replaced. A non-empty ``out_dir`` without our manifest is refused
    rather than overwritten. The new folder is built beside ``out_dir`` and renamed into place,
    so an interrupted run never leaves a half-written federation behind a valid manifest.

    Args:
        out_dir: destination folder.
        sites: number of sites (1 ... len(DEFAULT_SITE_PROFILES) without ``profiles``).
        cases_per_site: cases per site, one int for all or one count per site.
        test_cases: cases in the held-out folder (>= 1).
        size: voxels per axis of every case (16 ... 256).
        spacing_mm: isotropic voxel size in mm (1 ... 4).
        seed: the generation's seed.
        task: ``"tissue"`` (1 channel; CSF/GM/WM) or ``"brats"`` (4 channels; lesion labels 0/1/2/4).
        profiles: one :class:`ScannerProfile` per site; ``None`` takes the first ``sites`` defaults.
    """
    spec = _task_spec(task)
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ValueError(f"sites must be an int >= 1, got {sites!r}")
    if isinstance(test_cases, bool) or not isinstance(test_cases, int) or test_cases < 1:
        raise ValueError(f"test_cases must be an int >= 1, got {test_cases!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 256:
        raise ValueError(f"size must be an int in [16, 256], got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    spacing = _validate_spacing(spacing_mm)
    counts = _resolve_counts(sites, cases_per_site)
    chosen = _resolve_profiles(sites, profiles)
    out_dir = Path(out_dir)
    names = [f"site-{k + 1}" for k in range(sites)]

    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "task": task,
        "seed": seed,
        "size": size,
        "spacing_mm": spacing,
        "cases_per_site": list(counts),
        "test_cases": test_cases,
        "profiles": [p.to_dict() for p in chosen],
        "heldout_profile": HELDOUT_PROFILE.to_dict(),
    }
    data = FederationData(
        site_dirs=tuple(out_dir / n for n in names),
        test_dir=out_dir / "test",
        size=size,
        spacing_mm=spacing,
        num_classes=len(spec.labels),
        in_channels=len(spec.modalities),
    )
    if _manifest_matches(out_dir, params):
        logger.info("reusing the federation already in %s", out_dir)
        return data
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to overwrite it - "
            f"choose an empty or new folder"
        )

    templates = load_templates(spacing)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        jobs = [(name, k + 1, count, profile) for k, (name, count, profile) in enumerate(zip(names, counts, chosen))]
        # Stream 0 is the held-out set: its anatomy never coincides with a site's case.
        jobs.append(("test", 0, test_cases, HELDOUT_PROFILE))
        files = []
        for name, stream, count, profile in jobs:
            _write_site(staging / name, name=name, stream=stream, cases=count, task=task,
                        profile=profile, templates=templates, size=size, seed=seed)
            files += [str(p.relative_to(staging)) for p in sorted((staging / name).rglob("*")) if p.is_file()]
            logger.info("wrote %s: %d cases", name, count)
        manifest = {"params": params, "files": files}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, out_dir, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data


def _move_into_place(staging: Path, out_dir: Path, params: dict[str, Any]) -> None:
    """Rename ``staging`` to ``out_dir``, replacing an older generation of ours.

    When another process finished the same generation meanwhile (say, several client agents
    started at once), its folder is kept: it holds the same arrays.
    """
    if _manifest_matches(out_dir, params):
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        os.replace(staging, out_dir)
    except OSError:
        if not _manifest_matches(out_dir, params):
            raise


# --------------------------------------------------------------------------------------------------
# Summary and CLI


def _folder_summary(folder: Path) -> tuple[dict[str, Any], int, dict[int, float]]:
    dataset = json.loads((folder / "dataset.json").read_text())
    values = sorted(int(k) for k in dataset["labels"])
    totals = dict.fromkeys(values, 0)
    voxels = 0
    for entry in dataset["training"]:
        label = np.asarray(nib.Nifti1Image.from_filename(folder / entry["label"]).dataobj)
        voxels += label.size
        for v in values:
            totals[v] += int(np.count_nonzero(label == v))
    fractions = {v: totals[v] / max(voxels, 1) for v in values}
    return dataset, len(dataset["training"]), fractions


def describe(data: FederationData) -> str:
    """A human-readable summary: cases per folder, class fractions per folder, each site's profile."""
    lines = [f"federation: {len(data.site_dirs)} sites, {data.size}^3 voxels at {data.spacing_mm:g} mm, "
             f"{data.in_channels} channel(s), {data.num_classes} classes"]
    for folder in (*data.site_dirs, data.test_dir):
        dataset, count, fractions = _folder_summary(folder)
        names = dataset["labels"]
        balance = "  ".join(f"{names[str(v)]} {f:.3f}" for v, f in fractions.items())
        profile = dataset.get("fedseg", {}).get("profile", {})
        changed = {k: v for k, v in profile.items() if k in ScannerProfile.__dataclass_fields__
                   and ScannerProfile.from_dict({k: v}) != ScannerProfile()}
        profile_text = ", ".join(f"{k}={v}" for k, v in changed.items()) or "clean"
        lines.append(f"  {folder.name:<8} {count:3d} cases | {balance} | {profile_text}")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--task", choices=TASKS, default="tissue")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", default="6,4,8",
                        help="cases per site: one int for all or a comma list, one per site (default 6,4,8)")
    parser.add_argument("--test-cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=48, help="voxels per axis (default 48)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace, stream: TextIO) -> int:
    parts = [int(p) for p in str(args.cases).split(",") if p.strip()]
    cases: Sequence[int] | int = parts[0] if len(parts) == 1 else parts
    data = generate_federation(args.out, sites=args.sites, cases_per_site=cases,
                               test_cases=args.test_cases, size=args.size, spacing_mm=args.spacing,
                               seed=args.seed, task=args.task)
    stream.write(describe(data) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fedseg make-data``'s options."""
    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``fedseg make-data``: generate, then print :func:`describe`."""
    return _run(args, sys.stdout)


def main_generate(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """``fedseg make-data`` as a plain function: parse ``argv``, generate, print :func:`describe`."""
    parser = argparse.ArgumentParser(prog="fedseg make-data", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args, stream or sys.stdout)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
        return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    raise SystemExit(main_generate())
