"""Per-site ε(δ) from Opacus' RDP accountant, the ledger on the site's disk, and the budget a site keeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent_federation import Federation, federation_config, run_agent, settings
from client_agent.cli import EXIT_PRIVACY_BUDGET, main as agent_main
from client_agent.privacy import PrivacyBudgetExceeded, PrivacyLedger, gaussian_epsilon, rdp_epsilon

DELTA = 1e-5


def balle_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """The same bound worked out here: T releases of a Gaussian with multiplier σ (no sampling) are
    (α, T·α/(2σ²))-RDP; converted with Balle et al. 2020, Thm 21, minimised over Opacus' orders."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for a in orders:
        rdp = rounds * a / (2 * sigma**2)
        best = min(best, rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (1.0, 10), (2.5, 50), (0.8, 3)])
def test_epsilon_is_the_rdp_accountants(sigma: float, rounds: int) -> None:
    eps = gaussian_epsilon(sigma, rounds, DELTA)

    assert eps == pytest.approx(balle_epsilon(sigma, rounds, DELTA), rel=1e-9)
    # Tighter than the classic conversion (Mironov 2017, Prop. 3) the closed form used before.
    assert eps < rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / DELTA)) / sigma


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert gaussian_epsilon(1.0, 5, DELTA) < gaussian_epsilon(1.0, 6, DELTA)
    assert gaussian_epsilon(2.0, 5, DELTA) < gaussian_epsilon(1.0, 5, DELTA)
    assert rdp_epsilon([], DELTA) == 0.0
    assert rdp_epsilon([(0.0, 1.0, 1)], DELTA) == math.inf
    with pytest.raises(ValueError, match="delta must be in"):
        gaussian_epsilon(1.0, 1, 1.5)


def test_ledger_counts_each_round_once_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(path, delta=DELTA)
    ledger.record(1, 1.0)
    ledger.record(2, 1.0)
    ledger.record(2, 1.0)  # round 2 prepared again after a crash: its first update never left

    again = PrivacyLedger(path, delta=DELTA)
    assert again.rounds() == {1: 1.0, 2: 1.0}
    assert again.epsilon() == pytest.approx(gaussian_epsilon(1.0, 2, DELTA))
    again.record(3, 2.0)  # a different multiplier composes
    assert again.epsilon() == pytest.approx(rdp_epsilon([(1.0, 1.0, 2), (2.0, 1.0, 1)], DELTA))


def test_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    budget = (gaussian_epsilon(1.0, 2, DELTA) + gaussian_epsilon(1.0, 3, DELTA)) / 2  # room for two rounds
    ledger = PrivacyLedger(tmp_path / "privacy.json", delta=DELTA, budget=budget)
    for round_id in (1, 2):
        ledger.check(round_id, 1.0)
        ledger.record(round_id, 1.0)

    with pytest.raises(PrivacyBudgetExceeded, match=r"round 3 would take .* over its budget .* 2 round\(s\) already spent"):
        ledger.check(3, 1.0)


def test_an_unreadable_ledger_is_never_taken_for_an_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text("{ truncated")

    with pytest.raises(PrivacyBudgetExceeded, match="unreadable"):
        PrivacyLedger(path, delta=DELTA, budget=10.0).check(1, 1.0)


def test_agent_with_a_spent_budget_exits_before_joining(mni_site: Path, tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    PrivacyLedger(state / "privacy.json", delta=DELTA).record(1, 1.0)
    budget = gaussian_epsilon(1.0, 1, DELTA) * 1.01  # one round fits, a second does not

    code = agent_main(["--data", str(mni_site), "--aggregator", "127.0.0.1:9", "--site", "site-a",
                       "--state-dir", str(state), "--device", "cpu", "--dp-clip-norm", "1",
                       "--dp-noise-multiplier", "1", "--dp-epsilon-budget", str(budget)])

    assert code == EXIT_PRIVACY_BUDGET
    assert "over its budget" in capsys.readouterr().err


@pytest.mark.slow
def test_a_site_reports_epsilon_each_round_and_stops_at_its_budget(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    budget = (gaussian_epsilon(1.0, 2, DELTA) + gaussian_epsilon(1.0, 3, DELTA)) / 2
    with Federation(tmp_path, federation_config(rounds=3)) as fed:
        agent = settings(mni_site, state, fed.target, dp_clip_norm=1.0, dp_noise_multiplier=1.0,
                         dp_epsilon_budget=budget, dp_delta=DELTA)
        with pytest.raises(PrivacyBudgetExceeded, match="round 3"):
            run_agent(agent)
        reported = [dict(fed.round_metrics(r).sites[0].metrics.extra) for r in (1, 2)]

    assert [m["dp/epsilon"] for m in reported] == [pytest.approx(gaussian_epsilon(1.0, r, DELTA)) for r in (1, 2)]
    assert [m["dp/rounds"] for m in reported] == [1.0, 2.0]
    assert json.loads((state / "privacy.json").read_text())["rounds"] == {"1": 1.0, "2": 1.0}
