"""Site data generated from nilearn's MNI152: MSD layout, geometry, labels, site effects, BraTS task."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from experiments import brats_like, sitedata
from experiments.sitedata import (
    DEFAULT_SITE_PROFILES,
    HELDOUT_PROFILE,
    MANIFEST_NAME,
    FederationData,
    ScannerProfile,
    describe,
    generate_federation,
    load_templates,
    main_generate,
)

# 48^3 at 2 mm (96 mm) is the smallest box in which every case holds all four tissue classes.
SMALL: dict[str, Any] = dict(sites=3, cases_per_site=(2, 1, 2), test_cases=1, size=48, spacing_mm=2.0, seed=0)


def _cases(folder: Path) -> list[tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    dataset = json.loads((folder / "dataset.json").read_text())
    load = nib.Nifti1Image.from_filename
    return [(load(folder / e["image"]), load(folder / e["label"])) for e in dataset["training"]]


def _arrays(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(img.dataobj), np.asarray(lab.dataobj)) for img, lab in _cases(folder)]


@pytest.fixture(scope="module")
def tissue(tmp_path_factory: pytest.TempPathFactory) -> FederationData:
    return generate_federation(tmp_path_factory.mktemp("tissue") / "fed", **SMALL)


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> FederationData:
    return generate_federation(
        tmp_path_factory.mktemp("brats") / "fed", sites=2, cases_per_site=(2, 1), test_cases=1,
        size=48, seed=0, task="brats",
    )


# --- templates ------------------------------------------------------------------------------------


@pytest.mark.slow  # builds the 1 mm templates (seconds of CPU)
def test_templates_at_2mm_are_block_means_of_the_1mm_volumes() -> None:
    one, two = load_templates(1.0), load_templates(2.0)

    # 197 x 233 x 189 at 1 mm -> floor(n / 2) voxels; voxel i covers 1 mm voxels 2i and 2i + 1.
    assert one.t1.shape == (197, 233, 189)
    assert two.t1.shape == (98, 116, 94)
    np.testing.assert_allclose(np.diag(two.affine), [2, 2, 2, 1])
    np.testing.assert_allclose(two.affine[:3, 3], one.affine[:3, 3] + 0.5)
    block = one.t1[100:102, 120:122, 80:82]
    assert two.t1[50, 60, 40] == pytest.approx(float(block.mean()), abs=1e-6)


def test_template_labels_are_the_argmax_of_csf_gm_wm_inside_the_brain() -> None:
    t = load_templates(2.0)

    brain = t.brain >= 0.5
    assert set(np.unique(t.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(t.labels[~brain], 0)
    np.testing.assert_array_equal(t.labels[brain], np.argmax(t.probs, axis=0)[brain] + 1)
    # The probabilities partition the brain: CSF is what GM and WM leave.
    np.testing.assert_allclose(t.probs.sum(axis=0)[t.brain > 0.999], 1.0, atol=1e-5)
    # T1 contrast of the real template: CSF < GM < WM.
    means = [float(t.t1[t.labels == k].mean()) for k in (1, 2, 3)]
    assert means == sorted(means)


def test_load_templates_refuses_spacings_outside_1_to_4_mm() -> None:
    with pytest.raises(ValueError, match="spacing_mm must be in"):
        load_templates(0.5)


# --- small building blocks ------------------------------------------------------------------------


def test_upsample_knots_equals_a_3d_cubic_zoom() -> None:
    knots = np.random.default_rng(0).standard_normal((4, 5, 3))

    field = sitedata.upsample_knots(knots, (16, 20, 9))

    expected = ndimage.zoom(knots, (4, 4, 3), order=3, mode="nearest")
    np.testing.assert_allclose(field, expected, atol=1e-5)


def test_thick_slices_average_pairs_and_interpolate_back() -> None:
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32), (2, 2, 8)).copy()

    out = sitedata._apply_thick_slices(ramp, 2)

    # Thick slices hold 0.5, 2.5, 4.5, 6.5 at positions 0.5 ... 6.5: a linear ramp survives inside,
    # the two ends clamp to the outermost thick slice.
    np.testing.assert_allclose(out[0, 0], [0.5, 1, 2, 3, 4, 5, 6, 6.5])


def test_warp_affine_places_the_box_where_its_voxels_are_sampled() -> None:
    templates = load_templates(2.0)

    coords, affine = sitedata.warp_coordinates(np.random.default_rng(3), templates, 32, (0, 0, 10))

    np.testing.assert_allclose(np.diag(affine), [2, 2, 2, 1])
    # The box centre's world position (from the affine) and where it sampled the template differ
    # only by the smooth displacement (a few mm), not by the rotation or scaling.
    centre = np.array([15.5, 15.5, 15.5, 1.0])
    sampled = coords[:, 15:17, 15:17, 15:17].reshape(3, -1).mean(axis=1)
    world_sampled = templates.affine[:3, :3] @ sampled + templates.affine[:3, 3]
    assert np.linalg.norm((affine @ centre)[:3] - world_sampled) < 8.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("noise_std", -0.1, "noise_std must be a finite number >= 0"),
        ("bias_strength", float("nan"), "bias_strength must be a finite number >= 0"),
        ("bias_strength", 3.0, "bias_strength must be <= 2"),
        ("gamma", 0.0, r"gamma must be in \(0, 10\]"),
        ("contrast", -1.0, r"contrast must be in \(0, 10\]"),
        ("invert", 1, "invert must be a bool"),
        ("slice_factor", 0, r"slice_factor must be an int in \[1, 8\]"),
        ("fov_shift_mm", (0.0, 1.0), "fov_shift_mm must be three finite numbers"),
    ],
)
def test_scanner_profile_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScannerProfile(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("profile", [*DEFAULT_SITE_PROFILES, HELDOUT_PROFILE])
def test_scanner_profile_dict_round_trip(profile: ScannerProfile) -> None:
    assert ScannerProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_scanner_profile_from_dict_names_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown ScannerProfile fields \['snr'\]"):
        ScannerProfile.from_dict({"snr": 3})


def test_default_profiles_are_five_distinct_sites_and_heldout_is_outside_their_range() -> None:
    assert len(DEFAULT_SITE_PROFILES) == 5
    assert len(set(DEFAULT_SITE_PROFILES)) == 5
    assert HELDOUT_PROFILE not in DEFAULT_SITE_PROFILES
    assert HELDOUT_PROFILE.gamma < min(p.gamma for p in DEFAULT_SITE_PROFILES)
    assert HELDOUT_PROFILE.contrast > max(p.contrast for p in DEFAULT_SITE_PROFILES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sites=0), "sites must be an int >= 1"),
        (dict(sites=2, cases_per_site=(1, 2, 3)), "cases_per_site has 3 entries but sites=2"),
        (dict(sites=1, cases_per_site=0), "every site needs at least one case"),
        (dict(sites=6, cases_per_site=1), "only 5 default profiles exist"),
        (dict(task="liver"), "task must be one of"),
        (dict(size=8), r"size must be an int in \[16, 256\]"),
        (dict(spacing_mm=0.5), "spacing_mm must be in"),
        (dict(test_cases=0), "test_cases must be an int >= 1"),
    ],
)
def test_generate_federation_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_federation(tmp_path / "fed", **kwargs)
    assert not (tmp_path / "fed").exists()


# --- the tissue federation ------------------------------------------------------------------------


def test_msd_layout_and_dataset_json_list_every_file(tissue: FederationData) -> None:
    assert [d.name for d in tissue.site_dirs] == ["site-1", "site-2", "site-3"]
    assert tissue.test_dir.name == "test"
    for folder, count in zip((*tissue.site_dirs, tissue.test_dir), (2, 1, 2, 1)):
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["modality"] == {"0": "T1"}
        assert dataset["labels"] == {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
        assert dataset["numTraining"] == count == len(dataset["training"])
        listed = {e["image"] for e in dataset["training"]} | {e["label"] for e in dataset["training"]}
        on_disk = {f"./{p.relative_to(folder)}" for p in folder.rglob("*.nii.gz")}
        assert listed == on_disk
        for entry in dataset["training"]:
            assert entry["image"].replace("./imagesTr/", "") == entry["label"].replace("./labelsTr/", "")


def test_cases_have_the_grid_spacing_and_dtypes(tissue: FederationData) -> None:
    for folder in (*tissue.site_dirs, tissue.test_dir):
        for image, label in _cases(folder):
            assert image.shape == label.shape == (48, 48, 48)
            assert image.get_data_dtype() == np.float32
            assert label.get_data_dtype() == np.uint8
            assert image.header.get_zooms() == (2.0, 2.0, 2.0)
            np.testing.assert_allclose(image.affine, label.affine)
            np.testing.assert_allclose(np.diag(image.affine), [2, 2, 2, 1])
    assert (tissue.size, tissue.spacing_mm, tissue.num_classes, tissue.in_channels) == (48, 2.0, 4, 1)


def test_every_case_holds_exactly_the_four_tissue_classes(tissue: FederationData) -> None:
    for folder in (*tissue.site_dirs, tissue.test_dir):
        for _, label in _arrays(folder):
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3}


@pytest.mark.slow  # generates two more federations
def test_same_seed_writes_identical_arrays_and_another_seed_does_not(
    tissue: FederationData, tmp_path: Path
) -> None:
    again = generate_federation(tmp_path / "again", **SMALL)
    other = generate_federation(tmp_path / "other", **{**SMALL, "seed": 1})

    for first, second, third in zip(
        (*tissue.site_dirs, tissue.test_dir), (*again.site_dirs, again.test_dir), (*other.site_dirs, other.test_dir)
    ):
        for (img_a, lab_a), (img_b, lab_b), (img_c, lab_c) in zip(_arrays(first), _arrays(second), _arrays(third)):
            assert lab_a.tobytes() == lab_b.tobytes()
            np.testing.assert_array_equal(img_a, img_b)
            assert not np.array_equal(lab_a, lab_c)
            assert not np.array_equal(img_a, img_c)


def test_regenerating_with_the_same_parameters_reuses_the_folder(tissue: FederationData) -> None:
    out_dir = tissue.test_dir.parent
    manifest = out_dir / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns

    again = generate_federation(out_dir, **SMALL)

    assert again == tissue
    assert manifest.stat().st_mtime_ns == stamp


def test_other_parameters_replace_an_older_generation(tmp_path: Path) -> None:
    params: dict[str, Any] = dict(sites=1, cases_per_site=1, test_cases=1, size=16)
    generate_federation(tmp_path / "fed", **params)

    generate_federation(tmp_path / "fed", **{**params, "cases_per_site": 2})

    manifest = json.loads((tmp_path / "fed" / MANIFEST_NAME).read_text())
    assert manifest["params"]["cases_per_site"] == [2]
    assert len(list((tmp_path / "fed" / "site-1" / "imagesTr").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fed"]  # no staging folder left behind


def test_a_foreign_non_empty_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_federation(tmp_path / "fed", sites=1, cases_per_site=1, size=16)
    assert (tmp_path / "fed" / "notes.txt").read_text() == "mine"


def _tissue_means(folder: Path) -> dict[int, float]:
    pairs = _arrays(folder)
    return {k: float(np.concatenate([img[lab == k] for img, lab in pairs]).mean()) for k in (1, 2, 3)}


def _gm_wm_contrast_to_noise(folder: Path) -> float:
    pairs = _arrays(folder)
    gm = np.concatenate([img[lab == 2] for img, lab in pairs])
    wm = np.concatenate([img[lab == 3] for img, lab in pairs])
    return float((wm.mean() - gm.mean()) / np.sqrt(0.5 * (wm.var() + gm.var())))


def test_sites_differ_in_image_quality(tissue: FederationData) -> None:
    clean, older, _ = tissue.site_dirs

    # site-2 (more noise, bias and blur, flatter contrast) separates GM from WM much less well.
    assert _gm_wm_contrast_to_noise(clean) > 2.0
    assert _gm_wm_contrast_to_noise(older) < _gm_wm_contrast_to_noise(clean) - 0.4


def test_the_inverted_site_flips_the_tissue_order(tissue: FederationData) -> None:
    clean, _, inverted = tissue.site_dirs

    normal = _tissue_means(clean)
    flipped = _tissue_means(inverted)

    assert normal[1] < normal[2] < normal[3]  # T1: CSF < GM < WM
    assert flipped[1] > flipped[2] > flipped[3]  # T2-like: CSF > GM > WM


def test_a_superior_field_of_view_holds_more_background(tissue: FederationData) -> None:
    clean, superior, _ = tissue.site_dirs

    def background_fraction(folder: Path) -> float:
        return float(np.mean([np.mean(lab == 0) for _, lab in _arrays(folder)]))

    assert background_fraction(superior) > background_fraction(clean) + 0.03


def test_the_heldout_folder_records_the_heldout_profile(tissue: FederationData) -> None:
    dataset = json.loads((tissue.test_dir / "dataset.json").read_text())

    assert ScannerProfile.from_dict(dataset["fedseg"]["profile"]) == HELDOUT_PROFILE
    assert dataset["numTraining"] == 1


def test_describe_lists_each_folder_with_its_case_count(tissue: FederationData) -> None:
    text = describe(tissue)

    lines = text.splitlines()
    assert "3 sites" in lines[0]
    assert [line.split()[0:2] for line in lines[1:]] == [["site-1", "2"], ["site-2", "1"], ["site-3", "2"], ["test", "1"]]
    assert "invert=True" in lines[3]


@pytest.mark.slow  # the default generator builds the synth templates (seconds of CPU)
def test_main_generate_writes_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main_generate(["--out", str(tmp_path / "cli"), "--sites", "2", "--cases", "1,2", "--test-cases", "1",
                          "--size", "16"])

    assert code == 0
    assert "site-2     2 cases" in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "site-2" / "labelsTr").iterdir())) == 2


# --- the BraTS-like federation --------------------------------------------------------------------


@pytest.mark.slow  # generates a BraTS-like federation (place_lesion's tests below stay fast)
def test_brats_cases_have_four_channels_last_and_brats_labels(brats: FederationData) -> None:
    assert (brats.in_channels, brats.num_classes) == (4, 4)
    for folder in (*brats.site_dirs, brats.test_dir):
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["modality"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
        assert dataset["labels"] == {"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"}
        assert dataset["tensorImageSize"] == "4D"
        for image, label in _cases(folder):
            assert image.shape == (48, 48, 48, 4)
            assert image.get_data_dtype() == np.float32
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2, 4}


@pytest.mark.slow  # generates a BraTS-like federation (place_lesion's tests below stay fast)
def test_brats_compartments_show_their_mr_signature(brats: FederationData) -> None:
    pairs = _arrays(brats.site_dirs[0])  # site-1: normal (non-inverted) contrast
    image = np.concatenate([img.reshape(-1, 4) for img, _ in pairs])
    label = np.concatenate([lab.ravel() for _, lab in pairs])
    t1, t1ce, t2, flair = (image[:, c] for c in range(4))

    # Gadolinium lights up the rim only; necrosis is T1-dark and T2-bright; oedema FLAIR-bright.
    assert t1ce[label == 4].mean() > t1[label == 4].mean() + 0.2
    assert abs(t1ce[label == 1].mean() - t1[label == 1].mean()) < 0.05
    assert t1[label == 1].mean() < 0.35 < t2[label == 1].mean()
    assert flair[label == 2].mean() > flair[label == 0].mean()
    # Every lesion voxel is inside the head (T2 well above the noise floor of the background).
    assert np.mean(t2[label > 0] > 0.3) > 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_place_lesion_nests_compartments_inside_the_brain(seed: int) -> None:
    templates = load_templates(2.0)
    coords, _ = sitedata.warp_coordinates(np.random.default_rng(seed), templates, 48, (0, 0, 0))
    tissue = sitedata.sample_volume(templates.labels, coords, order=0)

    lesion = brats_like.place_lesion(np.random.default_rng(seed), tissue, 2.0)

    assert set(np.unique(lesion).tolist()) == {0, 1, 2, 4}
    assert np.all(tissue[lesion > 0] > 0)  # nothing outside the brain
    assert np.all(np.isin(tissue[lesion == 2], (2, 3)))  # oedema only in grey or white matter
    # The core is wrapped by the rim: dilating the core by one voxel stays within core + rim.
    grown = ndimage.binary_dilation(lesion == 1) & (tissue > 0)
    assert np.all(np.isin(lesion[grown], (1, 4)))


def test_place_lesion_needs_white_matter() -> None:
    with pytest.raises(ValueError, match="no white matter"):
        brats_like.place_lesion(np.random.default_rng(0), np.full((16, 16, 16), 2, np.uint8), 2.0)


def test_generated_folders_are_not_left_half_written_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitedata, "_save_nifti", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_federation(tmp_path / "fed", sites=1, cases_per_site=1, size=16)

    assert os.listdir(tmp_path) == []
