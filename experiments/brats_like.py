"""BraTS-like lesions on real anatomy: a synthetic glioma in the white matter of a deformed MNI152.

The anatomy (T1 and the CSF/GM/WM probability maps) comes from :mod:`experiments.sitedata`, warped
into a case's output grid as for the tissue task. This module adds what the MNI template lacks:

1. :func:`place_lesion` draws one lesion, centred in white matter far enough from the brain's edge,
   with the three BraTS compartments nested from the inside out: necrotic core (label 1), an
   enhancing rim (label 4) and oedema around it (label 2). Its shape is an irregular ellipsoid
   (random orientation and axis ratios, a smooth random perturbation of the radius). Oedema spreads
   along white matter and reaches less far into grey matter, and never into CSF.
2. :func:`synthesize_modalities` renders four MR contrasts, channels ``(T1, T1ce, T2, FLAIR)``, from
   the tissue probabilities (partial-volume mixing of per-tissue intensities) and the lesion's
   compartments (per-compartment intensities). The T1 and T1ce channels keep the real template's T1
   texture outside the lesion; T1ce differs from T1 only in the enhancing rim, as after gadolinium.

Label values are the original BraTS ones (0 background, 1 necrotic core, 2 oedema, 4 enhancing);
the Medical Segmentation Decathlon's Task01 renumbers them 0-3 in another order, so a reader must
take the values from ``dataset.json``. :func:`make_brats_case` chains warp -> lesion -> contrasts ->
scanner profile; nothing here does I/O. Arrays are ``(X, Y, Z)`` volumes of the case's grid,
channels first where stated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from experiments.sitedata import (
    ScannerProfile,
    Templates,
    apply_scanner_profile,
    sample_volume,
    smooth_random_field,
    warp_coordinates,
)

__all__ = [
    "BRATS_LABELS",
    "MODALITIES",
    "NECROTIC_CORE",
    "OEDEMA",
    "ENHANCING",
    "place_lesion",
    "synthesize_modalities",
    "make_brats_case",
]

NECROTIC_CORE = 1
OEDEMA = 2
ENHANCING = 4
BRATS_LABELS: dict[int, str] = {
    0: "background",
    NECROTIC_CORE: "necrotic core",
    OEDEMA: "oedema",
    ENHANCING: "enhancing tumour",
}
MODALITIES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")

_GM, _WM = 2, 3  # tissue labels of experiments.sitedata

# Normalised intensities per modality (rows, MODALITIES order) for CSF, GM, WM. The T1 row matches
# the MNI152 T1 itself (CSF ~70/255, GM ~167/255, WM ~220/255); the others follow the usual
# ordering at 1.5-3 T: T2 has bright CSF and GM above WM; FLAIR suppresses CSF.
_TISSUE_CONTRAST = np.array(
    [
        [0.27, 0.65, 0.86],  # T1
        [0.27, 0.65, 0.86],  # T1ce: same as T1 outside enhancing tissue
        [1.00, 0.62, 0.42],  # T2
        [0.12, 0.65, 0.48],  # FLAIR
    ],
    dtype=np.float32,
)
# Per lesion compartment: necrotic core, oedema, enhancing rim (BraTS label order 1, 2, 4).
# Necrosis is T1-dark, T2-bright; oedema is T2/FLAIR-bright; the rim takes up gadolinium.
_LESION_CONTRAST = np.array(
    [
        [0.20, 0.55, 0.60],  # T1
        [0.20, 0.55, 1.05],  # T1ce
        [0.92, 0.85, 0.65],  # T2
        [0.45, 0.98, 0.75],  # FLAIR
    ],
    dtype=np.float32,
)
_COMPARTMENTS = (NECROTIC_CORE, OEDEMA, ENHANCING)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def place_lesion(
    rng: np.random.Generator, tissue: np.ndarray, spacing_mm: float
) -> np.ndarray:
    """Draw one glioma-like lesion inside the white matter of ``tissue``.

    Args:
        rng: source of randomness (the only one used).
        tissue: ``(X, Y, Z)`` integer tissue labels (0 outside the brain, 1 CSF, 2 GM, 3 WM).
        spacing_mm: isotropic voxel size; lesion sizes are drawn in millimetres.

    Returns:
        ``(X, Y, Z)`` uint8 BraTS labels: 0, 1 (necrotic core), 2 (oedema), 4 (enhancing rim).
        The core and rim lie inside the brain; oedema lies in grey or white matter only.

    Raises:
        ValueError: when ``tissue`` holds no white matter to put a lesion in.
    """
    if tissue.ndim != 3:
        raise ValueError(f"tissue must be a 3D label volume, got shape {tissue.shape}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    wm = tissue == _WM
    if not wm.any():
        raise ValueError("tissue has no white matter (label 3): cannot place a lesion; enlarge the crop")
    brain = tissue > 0

    # Radii never fall below ~1.5 voxels so that every compartment survives at coarse spacings.
    # Whole-tumour radii of ~15-35 mm, like BraTS gliomas (tens of cm^3).
    r_core = max(float(rng.uniform(4.0, 9.0)), 1.5 * spacing_mm)
    rim = max(float(rng.uniform(3.0, 5.0)), 1.2 * spacing_mm)
    r_oedema = r_core + rim + max(float(rng.uniform(8.0, 20.0)), 2.0 * spacing_mm)

    depth_mm = ndimage.distance_transform_edt(brain) * spacing_mm
    deep_wm = wm & (depth_mm >= r_core + rim + 2.0)
    # Keep the tumour core and rim inside the field of view too, so each case shows all of it.
    margin = int(np.ceil((r_core + rim) / spacing_mm))
    in_view = np.zeros_like(wm)
    inner = tuple(slice(margin, max(margin, n - margin)) for n in tissue.shape)
    in_view[inner] = True
    candidates = np.argwhere(deep_wm & in_view)
    if len(candidates) == 0:
        candidates = np.argwhere(deep_wm)
    if len(candidates) == 0:
        # A small crop may hold only shallow white matter: take its deepest voxels instead.
        wm_depth = np.where(wm, depth_mm, -1.0)
        candidates = np.argwhere(wm_depth >= wm_depth.max() - 1e-6)
    centre = candidates[rng.integers(len(candidates))].astype(np.float64)

    # Irregular ellipsoid: distance in a randomly rotated, anisotropically scaled frame, with its
    # radius perturbed by a smooth field so that the boundary is lobulated rather than spherical.
    axes = rng.uniform(0.8, 1.25, size=3)
    frame = _random_rotation(rng) / axes[:, None]
    grid = np.indices(tissue.shape, dtype=np.float32).reshape(3, -1)
    offset_mm = (grid - centre[:, None].astype(np.float32)) * np.float32(spacing_mm)
    # einsum rather than matmul: no BLAS, so the label boundary does not depend on its threading.
    dist = np.linalg.norm(np.einsum("ij,jn->in", frame.astype(np.float32), offset_mm), axis=0)
    dist = dist.reshape(tissue.shape)
    dist *= 1.0 + 0.2 * smooth_random_field(rng, tissue.shape, 4)

    label = np.zeros(tissue.shape, dtype=np.uint8)
    # Oedema follows white-matter tracts; in grey matter it stops at a fraction of its reach.
    r_oedema_gm = r_core + rim + 0.4 * (r_oedema - r_core - rim)
    oedema = ((tissue == _WM) & (dist < r_oedema)) | ((tissue == _GM) & (dist < r_oedema_gm))
    label[oedema] = OEDEMA
    core = brain & (dist < r_core)
    # The enhancing rim wraps the necrotic core everywhere, as in glioblastoma: where the warped
    # distance would thin it below one voxel, the core's one-voxel shell keeps it closed.
    rim_shell = (dist < r_core + rim) | ndimage.binary_dilation(core)
    label[brain & rim_shell] = ENHANCING
    label[core] = NECROTIC_CORE
    return label


def synthesize_modalities(
    t1: np.ndarray,
    tissue_probs: np.ndarray,
    lesion: np.ndarray,
    *,
    rng: np.random.Generator,
    spacing_mm: float,
) -> np.ndarray:
    """Render the four BraTS contrasts of one case.

    Args:
        t1: ``(X, Y, Z)`` the real (warped) template T1, normalised so that white matter is ~0.86.
        tissue_probs: ``(3, X, Y, Z)`` CSF, GM and WM probabilities (zero outside the brain).
        lesion: ``(X, Y, Z)`` BraTS labels from :func:`place_lesion`.
        rng: source of the lesion's intensity heterogeneity.
        spacing_mm: voxel size; the lesion's edges are softened by ~0.6 mm of partial volume.

    Returns:
        ``(4, X, Y, Z)`` float32 channels in :data:`MODALITIES` order, clean (no scanner effects).
    """
    if tissue_probs.shape != (3, *t1.shape) or lesion.shape != t1.shape:
        raise ValueError(
            f"shapes disagree: t1 {t1.shape}, tissue_probs {tissue_probs.shape} (want (3, *t1.shape)), "
            f"lesion {lesion.shape}"
        )
    # Partial-volume mix of tissue intensities: (4, 3) x (3, X*Y*Z).
    channels = np.tensordot(_TISSUE_CONTRAST, tissue_probs.astype(np.float32), axes=(1, 0))
    channels = channels.astype(np.float32)
    channels[0] = t1
    channels[1] = t1

    # Oedema is strongest next to the tumour and fades outwards, leaving the anatomy visible
    # through it: its strength goes from 1 at the enhancing rim to 0.4 at its outer edge.
    oedema = lesion == OEDEMA
    strength = np.ones(t1.shape, dtype=np.float32)
    if oedema.any():
        to_tumour = ndimage.distance_transform_edt(~np.isin(lesion, (NECROTIC_CORE, ENHANCING)))
        to_outside = ndimage.distance_transform_edt(lesion > 0)
        reach = to_outside / np.maximum(to_tumour + to_outside, 1e-6)
        strength = np.where(oedema, 0.4 + 0.6 * reach, 1.0).astype(np.float32)

    # Soft compartment masks: a partition of the lesion blurred by one kernel, so they still sum
    # to the (blurred) lesion mask and the lesion blends into the anatomy without a hard edge.
    sigma = max(0.6 / spacing_mm, 0.35)
    weights = np.stack(
        [ndimage.gaussian_filter((lesion == c).astype(np.float32), sigma) for c in _COMPARTMENTS]
    )
    # Necrosis is heterogeneous, the rim and oedema less so.
    field = smooth_random_field(rng, t1.shape, max(3, t1.shape[0] // 6))
    heterogeneity = np.array([0.15, 0.05, 0.08], dtype=np.float32)
    for index, compartment_weight in enumerate(weights):
        contrast = _LESION_CONTRAST[:, index, None, None, None] * (1.0 + heterogeneity[index] * field)
        if _COMPARTMENTS[index] == OEDEMA:
            contrast = strength * contrast + (1.0 - strength) * channels
        channels = channels * (1.0 - compartment_weight) + compartment_weight * contrast
    return channels.astype(np.float32)


def make_brats_case(
    templates: Templates,
    *,
    size: int,
    profile: ScannerProfile,
    anatomy_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One BraTS-like case: a synthetic lesion in the white matter of a deformed MNI152.

    Returns:
        ``image`` ``(size, size, size, 4)`` float32 with channels last (T1, T1ce, T2, FLAIR; MSD
        Task01 also stores channels last), ``label`` ``(size, size, size)`` uint8 in {0, 1, 2, 4},
        and the ``(4, 4)`` affine.
    """
    coords, affine = warp_coordinates(anatomy_rng, templates, size, profile.fov_shift_mm)
    tissue = sample_volume(templates.labels, coords, order=0).astype(np.uint8)
    t1 = sample_volume(templates.t1, coords, order=1)
    brain = sample_volume(templates.brain, coords, order=1)
    probs = np.stack([sample_volume(p, coords, order=1) for p in templates.probs])
    lesion = place_lesion(anatomy_rng, tissue, templates.spacing_mm)
    clean = synthesize_modalities(t1, probs, lesion, rng=anatomy_rng, spacing_mm=templates.spacing_mm)
    image = apply_scanner_profile(clean, brain, profile, scanner_rng, templates.spacing_mm)
    return np.moveaxis(image, 0, -1), lesion, affine
