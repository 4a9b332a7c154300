"""The domain-randomized site generator: labels, contrasts, determinism, layout, the make-data switch."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments import sitedata
from experiments.synth import SYNTH_SITES, SynthRanges, generate_synth_federation, load_synth_templates, make_synth_case

# 32^3 at 6 mm (192 mm): a whole-brain field of view at a test's cost.
SMALL = dict(sites=3, cases_per_site=(1, 1, 1), test_cases=1, size=32, spacing_mm=6.0, seed=3)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> sitedata.FederationData:
    return generate_synth_federation(tmp_path_factory.mktemp("synth") / "fed", **SMALL)


def _case(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = json.loads((folder / "dataset.json").read_text())["training"][0]
    image = np.asarray(nib.load(str(folder / entry["image"])).dataobj)
    label = np.asarray(nib.load(str(folder / entry["label"])).dataobj)
    return image, label


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_templates_give_three_probabilities_that_sum_to_the_brain_mask() -> None:
    t = load_synth_templates(2.0)
    assert t.probs.shape[0] == 3 and np.all(t.probs >= 0)
    total = t.probs.sum(axis=0)
    assert float(total.max()) <= 1.0 + 1e-4
    brain = total >= 0.5
    # CSF is a real class (fluid as T1 shows it), not the template's near-empty residue.
    csf_share = float((np.argmax(t.probs, axis=0)[brain] == 0).mean())
    assert 0.05 < csf_share < 0.3


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_every_case_holds_all_classes_and_is_zero_outside_the_brain(federation: sitedata.FederationData) -> None:
    for folder in (*federation.site_dirs, federation.test_dir):
        image, label = _case(folder)
        assert image.shape == label.shape == (32, 32, 32)
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert np.all(image[label == 0] == 0) and np.all(image[label > 0] > 0)
        # The whole brain fits: the box's faces are (almost) all background.
        faces = np.concatenate([label[[0, -1]].ravel(), label[:, [0, -1]].ravel(), label[:, :, [0, -1]].ravel()])
        assert (faces > 0).mean() < 0.05


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_the_t1_like_and_t2_like_sites_order_tissues_oppositely(federation: sitedata.FederationData) -> None:
    means = []
    for folder in federation.site_dirs[:2]:
        image, label = _case(folder)
        means.append([float(image[label == k].mean()) for k in (1, 2, 3)])
    (csf1, _, wm1), (csf2, _, wm2) = means
    assert csf1 < wm1 and csf2 > wm2


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_generation_is_deterministic_and_reused(federation: sitedata.FederationData, tmp_path: Path) -> None:
    again = generate_synth_federation(tmp_path / "again", **SMALL)
    for a, b in zip((*federation.site_dirs, federation.test_dir), (*again.site_dirs, again.test_dir)):
        (ia, la), (ib, lb) = _case(a), _case(b)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    stamp = (again.site_dirs[0] / "dataset.json").stat().st_mtime_ns
    generate_synth_federation(tmp_path / "again", **SMALL)
    assert (again.site_dirs[0] / "dataset.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_sites_describe_their_randomization(federation: sitedata.FederationData) -> None:
    meta = json.loads((federation.site_dirs[2] / "dataset.json").read_text())["fedseg"]
    assert meta["generator"] == "synth" and meta["archetype"] == SYNTH_SITES[2][0]
    assert meta["ranges"]["slice_mm"] == [4.0, 8.0]
    assert "synth: T2-like" in sitedata.describe(federation)


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_a_case_is_fast_enough() -> None:
    import time

    t = load_synth_templates(2.0)
    rngs = sitedata._case_rngs(0, 1, 0)
    started = time.process_time()
    make_synth_case(t, size=64, spacing_mm=3.0, ranges=SYNTH_SITES[2][1], anatomy_rng=rngs[0], scanner_rng=rngs[1])
    assert time.process_time() - started < 3.0  # ~0.5 s of CPU on an idle core


@pytest.mark.parametrize("bad, message", [
    (dict(csf_mean=(0.5, 0.2)), "low <= high"),
    (dict(wm_mean=(0.0, 1.5)), r"lie in \[0, 1\]"),
    (dict(noise=(-0.1, 0.1)), ">= 0"),
    (dict(slice_mm=(0.0, 4.0)), "> 0 mm"),
])
def test_ranges_are_validated(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthRanges(**bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=8), "size must be an int in"),
    (dict(spacing_mm=0.5), "spacing_mm must be in"),
    (dict(cases_per_site=(1, 1)), "cases_per_site has 2 entries"),
])
def test_bad_parameters_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synth_federation(tmp_path / "x", **{**SMALL, **kwargs})


@pytest.mark.slow  # builds the synth templates (seconds of CPU)
def test_make_data_switches_between_generators(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--sites", "1", "--cases", "1", "--test-cases", "1", "--size", "16"]
    assert sitedata.main_generate(["--out", str(tmp_path / "s"), *common, "--spacing", "6"]) == 0
    assert "synth: T1-like" in capsys.readouterr().out
    assert sitedata.main_generate(["--out", str(tmp_path / "p"), *common, "--generator", "profile"]) == 0
    assert "synth" not in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "site-1" / "dataset.json").read_text())["fedseg"]["generator"] == "synth"
    with pytest.raises(SystemExit):
        sitedata.main_generate(["--out", str(tmp_path / "b"), *common, "--task", "brats"])
