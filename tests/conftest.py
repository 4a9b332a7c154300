"""Fixtures shared by several test files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis profiles: the default runs each property test's full count (hypothesis's 100, or the test's own
# max_examples); `--hypothesis-profile=fast` (`make test-fast`) a tenth of it. Tests that set their own count
# write it as support.examples(n), which scales with the profile.
settings.register_profile("fast", max_examples=10)

# torch and numpy's BLAS on one thread unless the caller chose otherwise: set before any test module
# imports them, and inherited by the processes tests start. On a few shared cores more threads only spin
# (`make test-fast` took about a third less CPU time this way on 2 busy cores).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation CA with a server certificate for localhost / 127.0.0.1 and sites a, b and c.

    Made once per session; tests must not modify it (copy it first).
    """
    from aggregator_service import certs

    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root)
    certs.issue_server(root, ["localhost"], ip_addresses=["127.0.0.1"])
    for site in ("a", "b", "c"):
        certs.issue_site(root, site)
    return root


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch with one intra-op thread: on a few shared cores more threads only add contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
