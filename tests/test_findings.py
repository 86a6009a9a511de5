"""`clipkd findings`: each finding's verdict on stores built to make it hold, be contradicted and stay unresolved,
and its numbers against hand-computed Bonferroni intervals."""
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness.cli import main
from results import findings
from results.findings import CONTRADICTED, HOLDS, UNRESOLVED
from results.paper import table1_deltas
from results.store import Store

TEACHER, LARGER = "clipkd-tiny-teacher@run:a", "clipkd-small-teacher@run:b"
BENCHMARK = "fashion-mnist"
BASELINE = np.array([0.700, 0.712, 0.690, 0.705, 0.698])  # per seed


def accuracies(gain: float, number: int, jitter: float, seeds: int = 5) -> np.ndarray:
    """The top-1 per seed of the ``number``-th cell: the baseline's, plus the gain, plus a wobble that alternates
    in sign from seed to seed, its size growing with the cell's number: every pair of cells differs by a wobble
    alternating in sign, so a large ``jitter`` leaves every paired interval straddling its threshold."""
    return BASELINE[:seeds] + (gain + jitter * number * (-1.0) ** np.arange(seeds)) / 100


def store_of(tmp_path, gains: dict, jitter: float = 0.02, seeds: int = 5, larger: float | None = None,
             similarity_slope: float = 1.0, items: bool = False) -> Store:
    """A store of one setting: the baseline and each method of ``gains`` (points over the baseline on every seed,
    plus ``jitter`` points of wobble), CLIP-KD from a larger teacher at ``larger`` points, and each distilled
    run's image CKA rising (slope > 0) or falling with its accuracy."""
    store = Store(f"sqlite:///{tmp_path / 'findings.db'}")
    rng = np.random.default_rng(0)
    cells = [(None, "baseline", 0.0)] + [(TEACHER, m, gains[m]) for m in gains]
    cells += [(LARGER, "crd+fd+icl", larger)] if larger is not None else []
    for number, (teacher, method, gain) in enumerate(cells):
        for seed, accuracy in enumerate(accuracies(gain, number, jitter, seeds)):
            metrics = {"acc1": accuracy}
            if teacher:
                metrics["feature_cka_image"] = 0.5 + similarity_slope * (accuracy - 0.7) + rng.normal(0, 1e-4)
            run_id = f"{number:02d}{seed}"
            bits = {BENCHMARK: {"acc1": rng.random(2000) < accuracy}} if items else None
            store.put_run({"id": run_id, "setting_id": "s", "name": run_id, "teacher": teacher, "student": "clipkd-tiny",
                           "method": method, "terms": "{}", "dataset": "fashion-mnist", "seed": seed, "status": "done",
                           "config": "{}", "teacher_params": {TEACHER: 8_000_000, LARGER: 12_000_000}.get(teacher)},
                          metrics={BENCHMARK: metrics}, items=bits)
    return store


# gains (points) in Table 1's order, each finding's claim true by a wide margin
AS_THE_PAPER = {"fd": 4.0, "mfd": 3.8, "icl": 2.6, "crd": 2.0, "gd": 1.5, "afd": 1.2, "fd+icl": 5.0,
                "crd+fd+icl": 6.0, "crd+fd+gd+icl": 6.1, "afd+crd+fd+icl": 5.9}
# Table 1's order reversed: every finding's claim false by a wide margin
AGAINST_THE_PAPER = {"afd": 3.0, "gd": 2.0, "crd": 1.0, "icl": 0.0, "mfd": -1.0, "fd": -2.0, "fd+icl": -4.0,
                     "crd+fd+icl": -3.0, "crd+fd+gd+icl": 0.0, "afd+crd+fd+icl": -3.1}


def verdicts(report) -> dict[int, str]:
    return {finding.number: finding.verdict for finding in report}


def test_the_verdict_rules():
    margin = 0.01
    assert findings.verdict("greater", 0.001, 0.02, margin) == HOLDS
    assert findings.verdict("greater", -0.02, -0.001, margin) == CONTRADICTED
    assert findings.verdict("greater", -0.001, 0.02, margin) == UNRESOLVED
    assert findings.verdict("close", -0.009, 0.009, margin) == HOLDS
    assert findings.verdict("close", 0.011, 0.03, margin) == CONTRADICTED
    assert findings.verdict("close", -0.03, -0.011, margin) == CONTRADICTED
    assert findings.verdict("close", 0.0, 0.02, margin) == UNRESOLVED
    assert findings.verdict("no notable gain", -0.05, 0.009, margin) == HOLDS
    assert findings.verdict("no notable gain", 0.011, 0.05, margin) == CONTRADICTED
    assert findings.verdict("no notable gain", 0.005, 0.015, margin) == UNRESOLVED
    assert findings.verdict("greater", np.nan, np.nan, margin) == UNRESOLVED


def test_a_store_made_for_the_paper_holds_every_finding(tmp_path):
    store = store_of(tmp_path, AS_THE_PAPER, larger=5.9)
    report = findings.findings(store)
    assert verdicts(report) == dict.fromkeys(range(1, 8), HOLDS)
    assert all(not f.missing for f in report) and {len(f.comparisons) for f in report} == {6, 5, 2, 3, 1}
    # FD+ICL − FD by hand: the paired t-interval of the per-seed differences, at 1 − 0.05/2 (two comparisons)
    third = {c.label: c for c in report[2].comparisons}["FD+ICL − FD"]
    number = {method: n for n, method in enumerate(AS_THE_PAPER, start=1)}
    fd_icl, fd = (accuracies(AS_THE_PAPER[m], number[m], 0.02) for m in ("fd+icl", "fd"))
    differences = (fd_icl - fd) * 100
    low, high = scipy_stats.t.interval(1 - 0.05 / 2, 4, differences.mean(), scipy_stats.sem(differences))
    p = scipy_stats.ttest_rel(fd_icl, fd).pvalue
    assert (third.estimate, third.low, third.high, third.p) == pytest.approx((differences.mean(), low, high, 2 * p))
    assert third.test == "paired t over 5 seeds"
    # the rank correlation is that of the mean Δs with Table 1's
    paper = table1_deltas()
    methods = sorted(paper)
    ours = [AS_THE_PAPER[m] for m in methods]
    spearman, kendall = report[6].comparisons
    assert spearman.estimate == pytest.approx(scipy_stats.spearmanr(ours, [paper[m] for m in methods]).statistic)
    assert kendall.estimate == pytest.approx(scipy_stats.kendalltau(ours, [paper[m] for m in methods]).statistic)
    assert spearman.test == "bootstrap over 5 seeds" and spearman.low <= spearman.estimate <= spearman.high


def test_rank_correlations_are_scipys_with_ties():
    """The bootstrap's vectorised ρ and τ-b equal scipy's on every row, ties included (Table 1 has none; a row of
    Δs may)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 4, (200, 7)).astype(float)
    rows = rows[np.ptp(rows, axis=1) > 0]
    for reference in (np.array(sorted(table1_deltas().values())), np.array([0.0, 1, 1, 2, 3, 3, 4])):
        assert findings.spearman(rows, reference) == pytest.approx(
            [scipy_stats.spearmanr(row, reference).statistic for row in rows], abs=1e-12)
        assert findings.kendall(rows, reference) == pytest.approx(
            [scipy_stats.kendalltau(row, reference).statistic for row in rows], abs=1e-12)


def test_a_store_made_against_the_paper_contradicts_every_finding(tmp_path):
    store = store_of(tmp_path, AGAINST_THE_PAPER, larger=0.0, similarity_slope=-1.0)
    assert verdicts(findings.findings(store)) == dict.fromkeys(range(1, 8), CONTRADICTED)


def test_a_noisy_store_resolves_nothing(tmp_path):
    """Small gains under a wobble of seeds far larger than they are: every interval straddles its threshold."""
    small = {m: 0.3 for m in AS_THE_PAPER}
    store = store_of(tmp_path, small, jitter=3.0, seeds=3, larger=0.3, similarity_slope=0.0)
    report = findings.findings(store)
    assert verdicts(report) == dict.fromkeys(range(1, 8), UNRESOLVED)
    assert all(c.verdict == UNRESOLVED for f in report for c in f.comparisons)


def test_one_seed_compares_over_test_items_and_missing_cells_are_named(tmp_path):
    store = store_of(tmp_path, {"fd": 4.0, "crd+fd+icl": 6.0}, seeds=1, items=True)
    report = findings.findings(store)
    fd = report[0].comparisons[0]
    assert fd.label == "FD − baseline" and fd.test == "paired bootstrap over 2000 items (one seed: test-set noise only)"
    assert report[0].missing == ["AFD", "CRD", "GD", "ICL", "MFD"]
    assert report[5].verdict == findings.UNTESTED and report[6].comparisons == []


def test_the_command_prints_every_finding_and_refuses_bad_input(tmp_path, capsys):
    store = store_of(tmp_path, AS_THE_PAPER, larger=5.9)
    db = str(store.engine.url)
    assert main(["findings", "--db", db, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["finding"] for row in rows} == set(range(1, 8))
    assert {row["finding_verdict"] for row in rows} == {HOLDS}
    assert main(["findings", "--db", db, "--format", "markdown"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "3. FD and ICL are complementary" in line)
    assert row.startswith("| 3.") and row.rstrip(" |").endswith("holds")
    assert "FD+ICL − FD +1.02 [" in row  # 1 point, and 0.02 × (7 − 1) × 1/5 of wobble
    assert "Bonferroni" in printed
    assert main(["findings", "--db", db]) == 0
    assert "6. A larger teacher is not always a better one: HOLDS" in capsys.readouterr().out
    assert main(["findings", "--db", db, "--margin", "0"]) == 2
    assert "--margin 0.0: points of top-1" in capsys.readouterr().err
    assert main(["findings", "--db", db, "--similarity", "cka"]) == 2
    assert "--similarity 'cka': one of cka_img" in capsys.readouterr().err
    assert main(["findings", "--db", db, "--grid", "grids/demo_findings.yaml"]) == 2  # none of its runs here
    assert "grid 'demo-findings' has no runs in this store; its grids: none" in capsys.readouterr().err
    assert main(["findings", "--db", db, "--benchmark", "imagenet1k"]) == 2
    assert "benchmark 'imagenet1k' has no values in this store; its benchmarks: fashion-mnist" in capsys.readouterr().err
