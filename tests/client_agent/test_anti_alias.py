"""Anti-aliasing before a resampling to a coarser spacing (client_agent.spacing.anti_alias / image_on_grid)."""

from __future__ import annotations

import numpy as np

from client_agent.spacing import anti_alias, grid_around, image_on_grid, resample_to_grid


def _stripes(shape: tuple[int, int, int], spacing: tuple[float, float, float], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Values 1 and 3 alternating every voxel along ``axis`` (mean 2), on a RAS grid of ``spacing``."""
    index = np.indices(shape)[axis]
    volume = np.where(index % 2 == 0, 1.0, 3.0).astype(np.float32)
    return volume, np.diag([*spacing, 1.0])


def test_fine_stripes_become_their_mean_on_a_coarse_grid() -> None:
    # 1 mm stripes sampled on a 4 mm grid whose voxel centres fall on the fine voxel centres: a
    # plain trilinear sample reads one stripe (1 or 3) per coarse voxel; the filtered one their mean.
    volume, affine = _stripes((64, 64, 64), (1.0, 1.0, 1.0), axis=0)
    grid = grid_around(volume, affine, spacing_mm=4.0, size=12, centre_mm=(32.0, 32.0, 32.0))
    inner = (slice(2, -2),) * 3  # away from the box's edges
    raw = resample_to_grid(volume, affine, grid, order=1)[inner]
    assert np.abs(raw - 2.0).max() > 0.9  # the test itself: without the filter the grid aliases
    filtered = resample_to_grid(anti_alias(volume, affine, 4.0), affine, grid, order=1)[inner]
    assert np.abs(filtered - 2.0).max() < 0.05


def test_no_filter_along_axes_already_as_coarse() -> None:
    # A 1x1x4 mm scan whose stripes run along its 4 mm axis: nothing to remove along that axis, and
    # in-plane smoothing of a volume constant in-plane changes nothing either.
    volume, affine = _stripes((16, 16, 12), (1.0, 1.0, 4.0), axis=2)
    np.testing.assert_allclose(anti_alias(volume, affine, 4.0), volume, atol=1e-5)
    # The same stripes along a 1 mm axis are averaged.
    across, affine = _stripes((16, 16, 12), (1.0, 1.0, 4.0), axis=0)
    assert np.ptp(anti_alias(across, affine, 4.0)[4:-4]) < 0.1


def test_a_volume_on_the_grid_spacing_or_coarser_is_returned_unchanged() -> None:
    volume, affine = _stripes((12, 12, 12), (4.0, 4.0, 4.0), axis=1)
    assert anti_alias(volume, affine, 4.0) is volume
    lps = np.diag([-6.0, -6.0, 6.0, 1.0])  # flipped axes: voxel sizes are the columns' lengths
    assert anti_alias(volume, lps, 4.0) is volume


def test_image_on_grid_filters_a_fine_scan_before_sampling() -> None:
    # A skull-stripped-like phantom: a ball of 1 mm stripes in a zero background, onto a 4 mm grid.
    # Stripes of period 3 voxels: a 4 mm grid steps through their phases, so unfiltered samples
    # alternate between the stripes' values whatever the grid's offset.
    shape = (80, 80, 80)
    affine = np.eye(4)
    volume = np.where(np.indices(shape)[1] % 3 == 0, 3.0, 1.0).astype(np.float32)
    xyz = np.indices(shape) - 39.5
    ball = np.sqrt((xyz ** 2).sum(axis=0)) < 30
    image = np.where(ball, volume, 0.0).astype(np.float32)
    on_grid, _ = image_on_grid(image, affine, spacing_mm=4.0, size=20, normalize="nonzero")
    inside = on_grid[0][on_grid[0] != 0]
    centre = on_grid[0][6:14, 6:14, 6:14]
    # The stripes' mean everywhere in the ball's core: flat there (unfiltered, the samples would
    # alternate stripe by stripe, about two standard deviations apart).
    assert inside.size > 0
    assert np.ptp(centre) < 0.05
