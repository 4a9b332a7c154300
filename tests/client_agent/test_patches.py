"""Training windows (``[model] patch_size``): client_agent.data.patches and the site's datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client_agent.data import RandPatch, build_datasets, check_patch_size


def _coordinates(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose voxels hold their own flat index and a label that is a function of it."""
    index = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    return index, (index.long() % 4)


def test_a_window_cuts_the_same_region_out_of_image_and_label() -> None:
    image, label = _coordinates((12, 10, 9))
    patch = RandPatch((4, 6, 5), foreground_fraction=0.5, seed=1)
    for _ in range(20):
        window, window_label = patch(image, label)
        assert tuple(window.shape) == (1, 4, 6, 5) and tuple(window_label.shape) == (1, 4, 6, 5)
        torch.testing.assert_close(window_label, window.long() % 4)
        # A contiguous box: the flat index steps by 9 along H and by 90 along D.
        first = int(window[0, 0, 0, 0])
        d, rest = divmod(first, 90)
        h, w = divmod(rest, 9)
        expected = image[:, d:d + 4, h:h + 6, w:w + 5]
        torch.testing.assert_close(window, expected)


def test_foreground_draws_always_hold_the_small_structure() -> None:
    label = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    label[0, 29, 2, 30] = 2  # one voxel of a rare class near a corner
    label[0, 10:20, 10:20, 10:20] = 1
    image = torch.zeros(1, 32, 32, 32)
    patch = RandPatch((8, 8, 8), foreground_fraction=1.0, seed=0)
    hits = [int((patch(image, label)[1] == 2).sum()) for _ in range(60)]
    # Each present class equally likely: about half the draws centre on the one-voxel class.
    assert 15 <= sum(hits) <= 45
    uniform = RandPatch((8, 8, 8), foreground_fraction=0.0, seed=0)
    assert sum(int((uniform(image, label)[1] == 2).sum()) for _ in range(60)) < 15  # 1 in 64 by chance


def test_uniform_draws_reach_every_position() -> None:
    patch = RandPatch((3, 3, 3), foreground_fraction=0.0, seed=2)
    label = np.zeros((5, 5, 5), dtype=np.int64)
    corners = {patch.corner(label) for _ in range(400)}
    assert corners == {(a, b, c) for a in range(3) for b in range(3) for c in range(3)}


def test_a_case_without_foreground_gets_a_uniform_window() -> None:
    patch = RandPatch((4, 4, 4), foreground_fraction=1.0, seed=0)
    assert all(0 <= c <= 4 for _ in range(10) for c in patch.corner(np.zeros((8, 8, 8), dtype=np.int64)))


def test_the_same_seed_draws_the_same_windows() -> None:
    label = np.zeros((20, 20, 20), dtype=np.int64)
    label[5:9, 5:9, 5:9] = 1
    first = RandPatch((8, 8, 8), seed=7)
    drawn = [first.corner(label) for _ in range(10)]
    again = RandPatch((8, 8, 8), seed=99).set_random_state(7)
    assert drawn == [again.corner(label) for _ in range(10)]
    other = RandPatch((8, 8, 8), seed=8)
    assert drawn != [other.corner(label) for _ in range(10)]


@pytest.mark.parametrize("patch, volume, message", [
    ((40, 8, 8), (32, 32, 32), r"patch_size \[40, 8, 8\] does not fit in volumes of \[32, 32, 32\]"),
    ((8, 8), (32, 32, 32), "three positive sizes"),
    ((8, 0, 8), (32, 32, 32), "three positive sizes"),
])
def test_a_window_that_does_not_fit_is_refused_naming_both_sizes(patch: tuple, volume: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_patch_size(patch, volume)


def test_a_volume_smaller_than_the_window_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        RandPatch((8, 8, 8))(torch.zeros(1, 6, 8, 8), torch.zeros(1, 6, 8, 8, dtype=torch.long))


def test_site_training_items_are_windows_and_validation_volumes_stay_whole(mni_site: Path, tmp_path: Path) -> None:
    data = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                          augment=False, cache_dir=tmp_path / "cache", patch_size=(8, 12, 8))
    item = data.train[0]
    assert tuple(item["image"].shape) == (1, 8, 12, 8) and tuple(item["label"].shape) == (1, 8, 12, 8)
    assert tuple(data.val[0]["image"].shape) == (1, 16, 16, 16)
    whole = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                           augment=False, cache_dir=tmp_path / "cache")
    volume = whole.train[0]["image"]
    # The window is a box of the whole training volume.
    found = any(torch.equal(volume[:, a:a + 8, b:b + 12, c:c + 8], item["image"])
                for a in range(9) for b in range(5) for c in range(9))
    assert found
    # Reseeding (every round) draws the same windows for the same seed.
    data.train.reseed(5)
    first = data.train[0]["image"]
    data.train.reseed(5)
    assert torch.equal(first, data.train[0]["image"])
    with pytest.raises(ValueError, match="does not fit"):
        build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                       augment=False, cache_dir=tmp_path / "cache", patch_size=(32, 32, 32))
