"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mni_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site folder of 3 labelled 32³ MNI152 cases (CSF / grey / white matter, 4 classes), MSD layout.

    Generated once per session; tests must not modify it (copy it first).
    """
    from experiments.sitedata import generate_federation

    data = generate_federation(
        tmp_path_factory.mktemp("mni-site"), sites=1, cases_per_site=(3,), test_cases=1, size=32, seed=1
    )
    return data.site_dirs[0]
