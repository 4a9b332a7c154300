"""Site data pipeline: layouts, validation, remapping, preprocessing, split, cache, loaders."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from client_agent.data import (
    AugmentConfig,
    Case,
    DataError,
    PreprocessConfig,
    VolumeCache,
    build_augmentation,
    build_datasets,
    discover_cases,
    load_image,
    make_loader,
    preprocess_case,
    regions_from_labels,
    remap_labels,
    resize_labels,
    resolve_label_map,
    split_cases,
    validate_cases,
)

SHAPE = (12, 10, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def image_data(channels: int = 1, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 20.0, size=(*shape, channels)).astype(np.float32)
    return data[..., 0] if channels == 1 else data


def label_data(values: tuple[int, ...] = (0, 1, 2), shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    # One slab per value along the first axis: every value present, easy to reason about.
    for i, v in enumerate(values):
        lab[i * shape[0] // len(values) : (i + 1) * shape[0] // len(values)] = v
    return lab


# ---------------------------------------------------------------- layouts


def make_paired(root: Path, ids: list[str], *, images: str = "images", labels: str = "labels") -> Path:
    for i, cid in enumerate(ids):
        write_nifti(root / images / f"{cid}.nii.gz", image_data(seed=i))
        write_nifti(root / labels / f"{cid}.nii.gz", label_data())
    return root


def make_msd(root: Path, ids: list[str], *, channels: int = 4) -> Path:
    for i, cid in enumerate(ids):
        write_nifti(root / "imagesTr" / f"{cid}.nii.gz", image_data(channels, seed=i))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label_data((0, 1, 2, 3)))
    meta = {
        "modality": {str(i): f"m{i}" for i in range(channels)},
        "labels": {"0": "background", "1": "a", "2": "b", "3": "c"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_paired_folders_are_matched_by_name(tmp_path: Path) -> None:
    make_paired(tmp_path, ["b", "a"])

    cases = discover_cases(tmp_path)

    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].image_paths == (tmp_path / "images" / "a.nii.gz",)
    assert cases[0].label_path == tmp_path / "labels" / "a.nii.gz"


def test_images_tr_labels_tr_without_dataset_json_is_paired(tmp_path: Path) -> None:
    make_paired(tmp_path, ["x"], images="imagesTr", labels="labelsTr")

    assert [c.case_id for c in discover_cases(tmp_path)] == ["x"]


def test_msd_dataset_json_with_4d_images(tmp_path: Path) -> None:
    make_msd(tmp_path, ["BRATS_001", "BRATS_002"], channels=4)

    cases = discover_cases(tmp_path)
    image, affine, spacing = load_image(cases[0].image_paths)

    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert cases[0].channel_names == ("m0", "m1", "m2", "m3")
    assert image.shape == (4, *SHAPE)
    assert spacing == (2.0, 2.0, 3.0)
    # Channels last in the file become channels first, in order.
    np.testing.assert_allclose(image[2], image_data(4, seed=0)[..., 2])


def test_msd_json_listing_missing_file_uses_nnunet_per_modality_files(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", image_data(seed=1))
    write_nifti(tmp_path / "imagesTr" / "c_0001.nii.gz", image_data(seed=2))
    write_nifti(tmp_path / "labelsTr" / "c.nii.gz", label_data())
    (tmp_path / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"}]})
    )

    (case,) = discover_cases(tmp_path)

    assert [p.name for p in case.image_paths] == ["c_0000.nii.gz", "c_0001.nii.gz"]


def test_per_modality_nnunet_files_stack_in_index_order(tmp_path: Path) -> None:
    # Written out of order on purpose: channel order comes from the _NNNN index.
    write_nifti(tmp_path / "images" / "case_0001.nii.gz", np.full(SHAPE, 1.0, np.float32))
    write_nifti(tmp_path / "images" / "case_0000.nii.gz", np.full(SHAPE, 0.0, np.float32))
    write_nifti(tmp_path / "images" / "case_0002.nii.gz", np.full(SHAPE, 2.0, np.float32))
    write_nifti(tmp_path / "labels" / "case.nii.gz", label_data())

    (case,) = discover_cases(tmp_path)
    image, _, _ = load_image(case.image_paths)

    assert case.channel_names == ("0000", "0001", "0002")
    assert image.shape == (3, *SHAPE)
    assert [float(image[c].mean()) for c in range(3)] == [0.0, 1.0, 2.0]


def test_per_modality_folder_per_case(tmp_path: Path) -> None:
    write_nifti(tmp_path / "images" / "p1" / "t1.nii.gz", image_data(seed=1))
    write_nifti(tmp_path / "images" / "p1" / "flair.nii.gz", image_data(seed=2))
    write_nifti(tmp_path / "labels" / "p1.nii.gz", label_data())

    (case,) = discover_cases(tmp_path)

    assert case.channel_names == ("flair", "t1")
    assert [p.name for p in case.image_paths] == ["flair.nii.gz", "t1.nii.gz"]


def test_brats_case_folders(tmp_path: Path) -> None:
    for cid in ("BraTS2021_00000", "BraTS2021_00002"):
        for i, mod in enumerate(("t1", "t1ce", "t2", "flair")):
            write_nifti(tmp_path / cid / f"{cid}_{mod}.nii.gz", image_data(seed=i))
        write_nifti(tmp_path / cid / f"{cid}_seg.nii.gz", label_data((0, 1, 2, 4)))

    cases = discover_cases(tmp_path)

    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].label_path.name == "BraTS2021_00000_seg.nii.gz"
    assert cases[0].channel_names == ("flair", "t1", "t1ce", "t2")


def test_flat_image_label_pairs(tmp_path: Path) -> None:
    write_nifti(tmp_path / "liver_7_image.nii", image_data())
    write_nifti(tmp_path / "liver_7_label.nii", label_data())

    (case,) = discover_cases(tmp_path)

    assert case.case_id == "liver_7"
    assert case.label_path.name == "liver_7_label.nii"


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda root: None, "no labelled NIfTI cases found"),
        (lambda root: write_nifti(root / "images" / "a.nii.gz", image_data()), "label folder"),
        (lambda root: (root / "images").mkdir() or (root / "labels").mkdir(), "no label files"),
        (
            lambda root: make_paired(root, ["a"]) and write_nifti(root / "labels" / "orphan.nii.gz", label_data()),
            "orphan.nii.gz has no image",
        ),
        (lambda root: write_nifti(root / "x_label.nii.gz", label_data()), "x_label.nii.gz has no image"),
        (lambda root: write_nifti(root / "case1" / "t1.nii.gz", image_data()), "exactly one label file"),
    ],
    ids=["empty", "images-without-labels-folder", "empty-labels-folder", "label-without-image", "flat-label-alone", "case-folder-without-label"],
)
def test_discovery_errors_name_the_folder_and_the_layouts(tmp_path: Path, setup, expected: str) -> None:
    setup(tmp_path)

    with pytest.raises(DataError) as info:
        discover_cases(tmp_path)

    assert expected in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert "accepted layouts" in str(info.value)


def test_image_without_label_becomes_a_missing_label_problem(tmp_path: Path) -> None:
    make_paired(tmp_path, ["a"])
    write_nifti(tmp_path / "images" / "lonely.nii.gz", image_data())

    cases = discover_cases(tmp_path)
    kept, problems = validate_cases(cases, num_classes=3)

    assert [c.case_id for c in kept] == ["a"]
    assert problems[0].path == tmp_path / "labels" / "lonely.nii.gz"
    assert "label file not found" in problems[0].reason


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nope")


# ---------------------------------------------------------------- validation


def _bad_case(kind: str, root: Path) -> tuple[Case, Path, str]:
    """A case with one defect; returns it, the file that must be named, and a reason fragment."""
    img = write_nifti(root / "images" / "bad.nii.gz", image_data())
    lab_path = root / "labels" / "bad.nii.gz"
    if kind == "unreadable-image":
        img.write_bytes(b"this is not a nifti file")
        write_nifti(lab_path, label_data())
        return Case("bad", (img,), lab_path), img, "not a readable NIfTI"
    if kind == "missing-label":
        return Case("bad", (img,), lab_path), lab_path, "label file not found"
    if kind == "unreadable-label":
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        lab_path.write_bytes(b"\x00" * 10)
        return Case("bad", (img,), lab_path), lab_path, "not a readable NIfTI"
    if kind == "shape-mismatch":
        write_nifti(lab_path, label_data(shape=(12, 10, 9)))
        return Case("bad", (img,), lab_path), lab_path, "differs from image shape"
    if kind == "affine-mismatch":
        shifted = AFFINE.copy()
        shifted[0, 3] = 5.0
        write_nifti(lab_path, label_data(), shifted)
        return Case("bad", (img,), lab_path), lab_path, "affine differs"
    if kind == "value-out-of-range":
        write_nifti(lab_path, label_data((0, 1, 7)))
        return Case("bad", (img,), lab_path), lab_path, "label values [7] outside [0, 3)"
    if kind == "non-integer-label":
        write_nifti(lab_path, label_data().astype(np.float32) + 0.5)
        return Case("bad", (img,), lab_path), lab_path, "non-integer"
    if kind == "modality-shape-mismatch":
        second = write_nifti(root / "images" / "bad_0001.nii.gz", image_data(shape=(12, 10, 9)))
        write_nifti(lab_path, label_data())
        return Case("bad", (img, second), lab_path), second, "modality shape"
    raise AssertionError(kind)


BAD_KINDS = [
    "unreadable-image",
    "missing-label",
    "unreadable-label",
    "shape-mismatch",
    "affine-mismatch",
    "value-out-of-range",
    "non-integer-label",
    "modality-shape-mismatch",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_is_skipped_with_its_path_and_reason(tmp_path: Path, kind: str, caplog) -> None:
    good_root = make_paired(tmp_path / "good", ["ok"])
    good = discover_cases(good_root)
    bad, culprit, reason = _bad_case(kind, tmp_path / "bad")

    with caplog.at_level(logging.WARNING, logger="client_agent.data"):
        kept, problems = validate_cases([*good, bad], num_classes=3, on_error="skip")

    assert [c.case_id for c in kept] == ["ok"]
    assert len(problems) == 1
    assert problems[0].path == culprit
    assert reason in problems[0].reason
    assert str(culprit) in caplog.text


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_fails_validation_with_its_path_and_reason(tmp_path: Path, kind: str) -> None:
    bad, culprit, reason = _bad_case(kind, tmp_path)

    with pytest.raises(DataError) as info:
        validate_cases([bad], num_classes=3, on_error="fail")

    assert str(culprit) in str(info.value)
    assert reason in str(info.value)


def test_small_affine_differences_are_tolerated(tmp_path: Path) -> None:
    nudged = AFFINE.copy()
    nudged[0, 0] += 1e-5
    img = write_nifti(tmp_path / "i.nii.gz", image_data())
    lab = write_nifti(tmp_path / "l.nii.gz", label_data(), nudged)

    kept, problems = validate_cases([Case("c", (img,), lab)], num_classes=3)

    assert problems == [] and len(kept) == 1


def test_case_with_odd_channel_count_is_reported(tmp_path: Path) -> None:
    cases = []
    for cid, channels in (("a", 2), ("b", 2), ("c", 3)):
        img = write_nifti(tmp_path / f"{cid}_image.nii.gz", image_data(channels))
        lab = write_nifti(tmp_path / f"{cid}_label.nii.gz", label_data())
        cases.append(Case(cid, (img,), lab))

    kept, problems = validate_cases(cases, num_classes=3)

    assert [c.case_id for c in kept] == ["a", "b"]
    assert problems[0].case_id == "c" and "3 channel(s)" in problems[0].reason and "have 2" in problems[0].reason


def test_out_of_range_raw_values_pass_once_remapped(tmp_path: Path) -> None:
    img = write_nifti(tmp_path / "i.nii.gz", image_data())
    lab = write_nifti(tmp_path / "l.nii.gz", label_data((0, 1, 2, 4)))
    case = Case("c", (img,), lab)

    _, without = validate_cases([case], num_classes=4)
    kept, with_map = validate_cases([case], num_classes=4, label_map=resolve_label_map("brats_regions"))

    assert "label values [4]" in without[0].reason
    assert with_map == [] and kept == [case]


def test_on_error_must_be_known() -> None:
    with pytest.raises(ValueError, match="on_error"):
        validate_cases([], num_classes=2, on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "preset, raw, expected",
    [
        ("brats_regions", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats_regions", [0, 1, 2, 3], [0, 1, 2, 3]),  # BraTS 2023 writes enhancing as 3
        ("msd_brain_tumour", [0, 1, 2, 3], [0, 2, 1, 3]),
        ("lits", [0, 1, 2], [0, 1, 2]),
        ("acdc", [0, 1, 2, 3], [0, 1, 2, 3]),
    ],
)
def test_label_presets(preset: str, raw: list[int], expected: list[int]) -> None:
    out = remap_labels(np.array(raw), resolve_label_map(preset))

    assert out.tolist() == expected


def test_label_map_from_config_accepts_string_keys_and_keeps_unlisted_values() -> None:
    mapping = resolve_label_map({"4": 3, "7": "1"})

    assert mapping == {4: 3, 7: 1}
    assert remap_labels(np.array([[0, 4], [7, 2]]), mapping).tolist() == [[0, 3], [1, 2]]


@pytest.mark.parametrize("spec, message", [("brats", "unknown label_map preset"), ({"a": 1}, "integers"), ({1: -1}, "negative")])
def test_bad_label_map_is_rejected(spec, message: str) -> None:
    with pytest.raises(DataError, match=message):
        resolve_label_map(spec)


def test_brats_regions_from_classes() -> None:
    # classes 0 bg, 1 necrotic core, 2 oedema, 3 enhancing
    regions = regions_from_labels(np.array([0, 1, 2, 3]))

    assert regions["ET"].tolist() == [False, False, False, True]
    assert regions["TC"].tolist() == [False, True, False, True]
    assert regions["WT"].tolist() == [False, True, True, True]


# ---------------------------------------------------------------- preprocessing


def test_preprocess_resizes_to_grid_normalizes_and_keeps_valid_labels(tmp_path: Path) -> None:
    img = write_nifti(tmp_path / "i.nii.gz", image_data(2))
    lab = write_nifti(tmp_path / "l.nii.gz", label_data((0, 1, 2, 4)))
    config = PreprocessConfig(spatial_size=(16, 20, 24), normalize="volume")

    vol = preprocess_case(Case("c", (img,), lab), config=config, label_map=resolve_label_map("brats_regions"), num_classes=4)

    assert vol.image.shape == (2, 16, 20, 24) and vol.image.dtype == np.float32
    assert vol.label.shape == (16, 20, 24)
    # Nearest interpolation invents no class: exactly the remapped values, never a blend like 2.5.
    assert sorted(np.unique(vol.label).tolist()) == [0, 1, 2, 3]
    # physical extent kept: 12 voxels of 2 mm -> 16 voxels of 1.5 mm; 10*2/20 = 1; 8*3/24 = 1
    assert vol.spacing == pytest.approx((1.5, 1.0, 1.0))


def test_volume_normalization_is_a_per_channel_z_score(tmp_path: Path) -> None:
    data = image_data(2)
    data[..., 1] = data[..., 1] * 10.0 + 3000.0  # a channel on a very different scale
    img = write_nifti(tmp_path / "i.nii.gz", data)
    lab = write_nifti(tmp_path / "l.nii.gz", label_data())

    # Same grid as the file: resizing is the identity, so the statistics are exactly the z-score's.
    vol = preprocess_case(Case("c", (img,), lab), config=PreprocessConfig(spatial_size=SHAPE, normalize="volume"))

    for c in range(2):
        assert float(vol.image[c].mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(vol.image[c].std()) == pytest.approx(1.0, abs=1e-4)


def test_nonzero_normalization_leaves_background_at_zero(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, np.float32)
    data[3:9, 2:8, 2:6] = np.random.default_rng(0).normal(500.0, 50.0, size=(6, 6, 4))
    img = write_nifti(tmp_path / "i.nii.gz", data)
    lab = write_nifti(tmp_path / "l.nii.gz", label_data())

    vol = preprocess_case(Case("c", (img,), lab), config=PreprocessConfig(spatial_size=SHAPE))

    assert np.all(vol.image[0][data == 0] == 0.0)
    assert float(vol.image[0][data != 0].mean()) == pytest.approx(0.0, abs=1e-4)


def test_lps_and_ras_files_give_the_same_canonical_volume(tmp_path: Path) -> None:
    data = image_data()
    flipped_affine = AFFINE.copy()
    flipped_affine[0, 0] = -2.0
    flipped_affine[0, 3] = 2.0 * (SHAPE[0] - 1)  # same world positions, first axis stored reversed
    a = write_nifti(tmp_path / "ras.nii.gz", data)
    b = write_nifti(tmp_path / "lps.nii.gz", data[::-1].copy(), flipped_affine)

    img_a, aff_a, _ = load_image(a)
    img_b, aff_b, _ = load_image(b)

    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_allclose(aff_a, aff_b)


def test_resize_labels_back_to_original_grid() -> None:
    label = label_data((0, 1, 2)).astype(np.int64)

    there = resize_labels(label, (24, 20, 16))
    back = resize_labels(there, SHAPE)

    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, label)


def test_load_image_replaces_nan_with_zero(tmp_path: Path) -> None:
    data = image_data()
    data[0, 0, 0] = np.nan
    path = write_nifti(tmp_path / "i.nii.gz", data)

    image, _, _ = load_image(path)

    assert np.isfinite(image).all() and image[0, 0, 0, 0] == 0.0


# ---------------------------------------------------------------- split


def _cases(n: int) -> list[Case]:
    return [Case(f"c{i:02d}", (Path(f"/x/{i}.nii"),), Path(f"/y/{i}.nii")) for i in range(n)]


@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.2, 2), (2, 0.2, 1), (3, 0.9, 2), (5, 0.01, 1)])
def test_split_is_disjoint_complete_and_sized(n: int, fraction: float, n_val: int) -> None:
    train, val = split_cases(_cases(n), val_fraction=fraction, seed=3)

    assert len(val) == n_val
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in _cases(n)}
    assert not {c.case_id for c in train} & {c.case_id for c in val}


def test_split_depends_on_seed_not_on_input_order() -> None:
    cases = _cases(20)

    first = split_cases(cases, val_fraction=0.25, seed=7)
    reordered = split_cases(list(reversed(cases)), val_fraction=0.25, seed=7)
    other_seeds = [split_cases(cases, val_fraction=0.25, seed=s)[1] for s in range(8, 12)]

    assert first == reordered
    assert any(v != first[1] for v in other_seeds)


def test_single_case_trains_and_validates_on_itself(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="client_agent.data"):
        train, val = split_cases(_cases(1), val_fraction=0.2, seed=0)

    assert train == val == _cases(1)
    assert "only one usable case" in caplog.text


# ---------------------------------------------------------------- datasets, cache, loaders


def test_build_datasets_items_and_batches(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "site", [f"c{i}" for i in range(5)], channels=2)

    site = build_datasets(root, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.4, seed=1, augment=False)
    item = site.train[0]
    batch = next(iter(make_loader(site.train, batch_size=2, shuffle=True, seed=0)))

    assert (len(site.train), len(site.val), site.in_channels, site.num_classes) == (3, 2, 2, 4)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, 16, 16, 16)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 16, 16, 16)
    assert item["spacing"].tolist() == pytest.approx([12 * 2 / 16, 10 * 2 / 16, 8 * 3 / 16])
    assert batch["image"].shape == (2, 2, 16, 16, 16) and batch["label"].shape == (2, 1, 16, 16, 16)
    assert batch["spacing"].shape == (2, 3) and len(batch["case_id"]) == 2


def test_build_datasets_skips_bad_cases_and_reports_them(tmp_path: Path) -> None:
    root = make_paired(tmp_path, ["a", "b", "c"])
    (root / "labels" / "c.nii.gz").write_bytes(b"garbage")

    site = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=False)

    assert len(site.train) + len(site.val) == 2
    assert [p.path.name for p in site.problems] == ["c.nii.gz"]


def test_build_datasets_with_nothing_usable_fails(tmp_path: Path) -> None:
    root = make_paired(tmp_path, ["a"])
    write_nifti(root / "labels" / "a.nii.gz", label_data((0, 9)))

    with pytest.raises(DataError, match="no usable case"):
        build_datasets(root, spatial_size=(8, 8, 8), num_classes=3)


def test_disk_cache_is_used_after_the_first_pass(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "site", ["a", "b", "c"])
    cache_dir = tmp_path / "cache"
    site = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=False, cache_dir=cache_dir)

    first = [site.train[i]["image"] for i in range(len(site.train))]
    files = sorted(cache_dir.glob("*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = [site.train[i]["image"] for i in range(len(site.train))]
    # A new process (here: a new dataset) finds the volumes on disk too.
    fresh = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=False, cache_dir=cache_dir)
    _ = [fresh.train[i] for i in range(len(fresh.train))]

    assert len(files) == len(site.train)
    assert site.train.cache.stats.computed == len(site.train)
    assert site.train.cache.stats.disk_hits == len(site.train)
    assert fresh.train.cache.stats.computed == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)


def test_cache_entry_is_replaced_when_the_file_changes(tmp_path: Path) -> None:
    root = make_paired(tmp_path / "site", ["a"])
    cache = VolumeCache(config=PreprocessConfig(spatial_size=(8, 8, 8)), label_map=None, num_classes=3, cache_dir=tmp_path / "c")
    (case,) = discover_cases(root)
    cache.get(case)
    old = sorted((tmp_path / "c").glob("*.npz"))

    write_nifti(case.image_paths[0], image_data(seed=99))
    os.utime(case.image_paths[0], ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    cache.get(case)
    new = sorted((tmp_path / "c").glob("*.npz"))

    assert cache.stats.computed == 2
    assert len(old) == len(new) == 1 and old != new


def test_memory_cache_without_cache_dir(tmp_path: Path) -> None:
    root = make_paired(tmp_path, ["a", "b"])
    site = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=False)

    for _ in range(3):
        _ = [site.train[i] for i in range(len(site.train))]

    assert site.train.cache.stats.computed == 1
    assert site.train.cache.stats.memory_hits == 2


def test_augmentation_is_seeded_changes_the_volume_and_keeps_labels_valid(tmp_path: Path) -> None:
    volume = {"image": torch.randn(1, 16, 16, 16), "label": torch.from_numpy(label_data((0, 1, 2), (16, 16, 16)))[None].float()}
    config = AugmentConfig(affine_prob=1.0, elastic_prob=1.0, flip_prob=0.5, intensity_prob=1.0, noise_prob=1.0)

    a = build_augmentation(config, spatial_size=(16, 16, 16), seed=5)(dict(volume))
    b = build_augmentation(config, spatial_size=(16, 16, 16), seed=5)(dict(volume))
    c = build_augmentation(config, spatial_size=(16, 16, 16), seed=6)(dict(volume))

    torch.testing.assert_close(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    assert not torch.allclose(torch.as_tensor(a["image"]), torch.as_tensor(c["image"]))
    assert a["image"].shape == (1, 16, 16, 16)
    assert set(torch.unique(torch.as_tensor(a["label"])).tolist()) <= {0.0, 1.0, 2.0}


def test_train_set_is_augmented_and_validation_set_is_not(tmp_path: Path) -> None:
    root = make_paired(tmp_path, ["a", "b", "c", "d"])
    aug = AugmentConfig(affine_prob=1.0, elastic_prob=0.0)
    site = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=aug, val_fraction=0.5)

    assert not torch.equal(site.train[0]["image"], site.train[0]["image"])
    torch.testing.assert_close(site.val[0]["image"], site.val[0]["image"])
    assert site.train[0]["label"].dtype == torch.int64


def test_loader_order_is_reproducible_from_seed(tmp_path: Path) -> None:
    root = make_paired(tmp_path, [f"c{i}" for i in range(6)])
    site = build_datasets(root, spatial_size=(4, 4, 4), num_classes=3, augment=False, val_fraction=0.2)

    def order(seed: int) -> list[str]:
        return [cid for b in make_loader(site.train, batch_size=1, shuffle=True, seed=seed) for cid in b["case_id"]]

    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(c.case_id for c in site.train.cases)


@pytest.mark.slow  # starts DataLoader worker processes
def test_worker_augmentation_is_reproducible_from_seed(tmp_path: Path) -> None:
    root = make_paired(tmp_path, ["a", "b", "c", "d", "e"])
    aug = AugmentConfig(affine_prob=1.0, elastic_prob=0.0)
    site = build_datasets(root, spatial_size=(8, 8, 8), num_classes=3, augment=aug, val_fraction=0.2)

    def images(seed: int) -> torch.Tensor:
        loader = make_loader(site.train, batch_size=1, shuffle=False, seed=seed, num_workers=2)
        return torch.cat([b["image"] for b in loader])

    first, again, other = images(1), images(1), images(2)

    torch.testing.assert_close(first, again)
    # Workers get distinct seeds: no two volumes share one augmentation draw, and seeds matter.
    assert not torch.allclose(first, other)
