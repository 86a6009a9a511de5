"""The paper's findings (CLIP-KD §4.2–§4.4) tested on the store: each finding, its comparisons, and a verdict.

A finding is a claim about cells of one setting (a student on its data, one teacher): "FD+ICL beats FD", "MFD is
close to FD", "adding GD brings no notable gain". Each comparison is a paired Δ of zero-shot top-1 — paired by seed
(a t-interval of the per-seed differences, ``stats.paired_by_seed``) where two seeds or more are shared, else a
paired bootstrap over the test items of the two runs — or a correlation. Within a finding the intervals are
Bonferroni-adjusted: each at 1 − α/m for its m comparisons, so that all of them hold together at 1 − α, and the
p-values are multiplied by m. A comparison's verdict reads its adjusted interval against its claim:

- *greater* (A beats B): holds when the interval is above 0, contradicted when below;
- *close* (A within ± margin of B): holds when the interval lies inside ± margin, contradicted when it lies
  wholly outside;
- *no notable gain* (A − B below the margin): holds when the interval's top is below the margin, contradicted
  when its bottom is above;

and anything else is *unresolved at this power*. A finding holds when all of its comparisons hold (or, for "not
always", any), is contradicted when one is (all are), and is otherwise unresolved. ``margin`` is in points of
top-1: what the report counts as a notable difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from sqlalchemy import select

from results import stats
from results.paper import table1_deltas
from results.queries import QueryError, filter_options, grid_cells, metric_name, per_seed
from results.store import Run, Store

HOLDS, CONTRADICTED, UNRESOLVED, UNTESTED = "holds", "contradicted", "unresolved at this power", "not tested"
GREATER, CLOSE, NO_NOTABLE_GAIN = "greater", "close", "no notable gain"
ACCURACY = "acc1"
MARGIN = 0.01  # one point of top-1
SIMILARITIES = ("cka_img", "cka_txt", "cos_img", "cos_txt", "sim_gap")  # results.queries' names
ABLATION = 3  # a teacher with this many of the paper's methods is reported on its own
RESAMPLES = 10_000  # bootstrap resamples of the seeds for the rank correlations

CLIP_KD, FD_ICL = "crd+fd+icl", "fd+icl"
SINGLE = ["crd", "fd", "mfd", "gd", "icl", "afd"]
NAMES = {"baseline": "baseline", "crd": "CRD", "fd": "FD", "mfd": "MFD", "gd": "GD", "icl": "ICL", "afd": "AFD",
         FD_ICL: "FD+ICL", CLIP_KD: "CLIP-KD", "crd+fd+gd+icl": "CLIP-KD+GD", "afd+crd+fd+icl": "CLIP-KD+AFD"}


@dataclass(frozen=True)
class Comparison:
    label: str  # "FD+ICL − FD", "Pearson r (feature_cka_image, top-1)"
    claim: str  # GREATER, CLOSE or NO_NOTABLE_GAIN
    estimate: float  # a Δ in points of top-1, or a correlation
    low: float
    high: float
    p: float  # Bonferroni-adjusted
    test: str
    verdict: str
    points: bool = True  # a Δ in points of top-1 (signed), else a correlation


@dataclass(frozen=True)
class Finding:
    number: int
    claim: str
    paper: str
    setting: str
    comparisons: list[Comparison] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # cells the store lacks
    any_of: bool = False  # "not always": one comparison holding is enough

    @property
    def verdict(self) -> str:
        verdicts = [c.verdict for c in self.comparisons]
        if not verdicts:
            return UNTESTED
        holding, contradicting = (any, all) if self.any_of else (all, any)
        if holding(v == HOLDS for v in verdicts):
            return HOLDS
        if contradicting(v == CONTRADICTED for v in verdicts):
            return CONTRADICTED
        return UNRESOLVED


def verdict(claim: str, low: float, high: float, margin: float) -> str:
    """A comparison's verdict from its (adjusted) interval; the module's docstring states the rules."""
    if np.isnan(low) or np.isnan(high):
        return UNRESOLVED
    holds, contradicted = {
        GREATER: (low > 0, high < 0),
        CLOSE: (-margin < low and high < margin, low > margin or high < -margin),
        NO_NOTABLE_GAIN: (high < margin, low > margin),
    }[claim]
    return HOLDS if holds else CONTRADICTED if contradicted else UNRESOLVED


class Cells:
    """One setting's per-seed top-1 (and feature similarity) by (teacher, method), and the runs behind them."""

    def __init__(self, store: Store, frame: pd.DataFrame, benchmark: str, similarity: str, teacher: str | None):
        self.store, self.benchmark, self.similarity, self.teacher = store, benchmark, similarity, teacher
        self.values: dict[tuple, dict[int, float]] = {}
        self.runs: dict[tuple, dict[int, str]] = {}
        self._packed: dict[str, tuple[int, bytes]] | None = None
        for row in frame.itertuples(index=False):
            key = (None if row.method == "baseline" else row.teacher, row.method, row.metric)
            self.values.setdefault(key, {})[int(row.seed)] = float(row.value)
            self.runs.setdefault(key[:2], {})[int(row.seed)] = row.run_id

    def _key(self, method: str, teacher: str | None) -> tuple[str | None, str]:
        """(teacher, method) as stored: the baseline has no teacher; a method's is this section's unless named."""
        return None if method == "baseline" else teacher or self.teacher, method

    def top1(self, method: str, teacher: str | None = None) -> dict[int, float] | None:
        return self.values.get((*self._key(method, teacher), ACCURACY))

    def _run(self, method: str, teacher: str | None, seed: int) -> str | None:
        return self.runs.get(self._key(method, teacher), {}).get(seed)

    def compare(self, family: list[tuple[str, str, tuple, tuple]], margin: float, confidence: float
                ) -> list[Comparison]:
        """Each (label, claim, A, B) of a family — A and B being (method, teacher) pairs the store has — as A − B in
        points of top-1, its interval at the family's Bonferroni level: paired by seed where two seeds or more are
        shared, else a paired bootstrap over the test items of one seed's two runs (test-set noise only; the
        setting's items are read once, and the family's bootstraps run as one), else no interval."""
        adjusted, found, by_items = 1 - (1 - confidence) / len(family), [], {}
        for label, claim, a, b in family:
            first, second = self.top1(*a), self.top1(*b)
            by_seed = stats.paired_by_seed(first, second, adjusted)
            if by_seed is not None:
                found.append((label, claim, *by_seed, f"paired t over {by_seed[0].n} seeds"))
                continue
            estimate = float(np.mean(list(first.values())) - np.mean(list(second.values())))
            found.append((label, claim, stats.Interval(estimate, np.nan, np.nan, "none", 0), np.nan,
                          "no interval (one seed, no per-item results)"))
            shared = sorted(set(first) & set(second))
            items = self._items()
            pair = [items.get(self._run(*side, shared[0])) for side in (a, b)] if shared else [None]
            if None not in pair and pair[0][0] == pair[1][0]:
                by_items[len(found) - 1] = stats.packed_item_table(pair[0][1], pair[1][1], pair[0][0])
        for index, (interval, p) in zip(by_items, stats.paired_from_tables(list(by_items.values()), adjusted)
                                        if by_items else []):
            label, claim, *_ = found[index]
            found[index] = (label, claim, interval, p,
                            f"paired bootstrap over {interval.n} items (one seed: test-set noise only)")
        return [Comparison(label, claim, 100 * interval.estimate, 100 * interval.low, 100 * interval.high,
                           min(1.0, p * len(family)), test, verdict(claim, interval.low, interval.high, margin))
                for label, claim, interval, p, test in found]

    def _items(self) -> dict[str, tuple[int, bytes]]:
        """Every run's per-item top-1 of the setting, read in one query the first time a comparison needs them."""
        if self._packed is None:
            ids = {run for by_seed in self.runs.values() for run in by_seed.values()}
            self._packed = self.store.packed_items(ids, self.benchmark, ACCURACY)
        return self._packed


def _pairwise(cells: Cells, pairs: list[tuple[str, str, str]], margin: float, confidence: float
              ) -> tuple[list[Comparison], list[str]]:
    """Each (A, B, claim) the store has, compared within one family; the methods it lacks, named."""
    tested = [(f"{NAMES.get(a, a)} − {NAMES.get(b, b)}", claim, (a, None), (b, None))
              for a, b, claim in pairs if cells.top1(a) and cells.top1(b)]
    missing = sorted({NAMES.get(m, m) for a, b, _ in pairs for m in (a, b) if not cells.top1(m)})
    return (cells.compare(tested, margin, confidence) if tested else []), missing


def _similarity_follows(cells: Cells, confidence: float) -> Comparison | None:
    """Finding 5: Pearson's r of feature similarity and top-1 over the teacher's distilled runs (Fisher z)."""
    accuracy, similar = [], []
    for (teacher, method, metric), by_seed in cells.values.items():
        if teacher != cells.teacher or metric != ACCURACY:
            continue
        similarity = cells.values.get((teacher, method, cells.similarity), {})
        for seed in sorted(set(by_seed) & set(similarity)):
            accuracy.append(by_seed[seed])
            similar.append(similarity[seed])
    found = stats.correlation(similar, accuracy, confidence)
    if found is None:
        return None
    r, p = found
    return Comparison(f"Pearson r ({cells.similarity}, top-1) over {r.n} distilled runs", GREATER, r.estimate,
                      r.low, r.high, p, "Fisher z", verdict(GREATER, r.low, r.high, 0.0), points=False)


def spearman(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of ``x`` with ``reference`` (ties averaged, as ``scipy.stats.spearmanr``)."""
    ranks = scipy_stats.rankdata(x, axis=-1) - (x.shape[-1] + 1) / 2
    theirs = scipy_stats.rankdata(reference) - (len(reference) + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return ranks @ theirs / np.sqrt((ranks**2).sum(-1) * (theirs**2).sum())


def kendall(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row of ``x`` with ``reference`` (``scipy.stats.kendalltau``'s): concordant minus
    discordant pairs over the geometric mean of each side's untied pairs."""
    first, second = np.triu_indices(len(reference), 1)
    mine, theirs = np.sign(x[..., first] - x[..., second]), np.sign(reference[first] - reference[second])
    with np.errstate(invalid="ignore", divide="ignore"):
        return mine @ theirs / np.sqrt((mine**2).sum(-1) * (theirs**2).sum())


def _rank_agreement(cells: Cells, confidence: float) -> list[Comparison]:
    """Table 1's order: Spearman's ρ and Kendall's τ between the methods' Δs over the baseline and Table 1's, each
    with a percentile bootstrap interval over seeds (``scipy.stats.bootstrap``; a seed's runs are resampled
    together, so that the runs sharing a seed's initialisation and data order stay paired)."""
    paper = {m: d for m, d in table1_deltas().items() if cells.top1(m)}
    baseline = cells.top1("baseline")
    if len(paper) < 3 or not baseline:
        return []
    methods = sorted(paper)
    seeds = sorted(set(baseline).intersection(*(cells.top1(m) for m in methods)))
    if not seeds:
        return []
    deltas = np.array([[cells.top1(m)[s] - baseline[s] for m in methods] for s in seeds])
    reference = np.array([paper[m] for m in methods])
    names = ("Spearman ρ", "Kendall τ")

    def statistic(rows: np.ndarray, axis: int = -1) -> np.ndarray:  # rows: (..., seeds), resampled
        means = deltas[rows.astype(int)].mean(-2)
        return np.stack([spearman(means, reference), kendall(means, reference)])

    labels = [f"{name} of {len(methods)} methods' Δ with Table 1's" for name in names]
    estimates = statistic(np.arange(len(seeds)))
    if len(seeds) < 2:
        return [Comparison(label, GREATER, float(e), np.nan, np.nan, np.nan, "one seed: no interval", UNRESOLVED,
                           points=False) for label, e in zip(labels, estimates)]
    interval = scipy_stats.bootstrap((np.arange(len(seeds)),), statistic, method="percentile", n_resamples=RESAMPLES,
                                     confidence_level=1 - (1 - confidence) / len(names),
                                     rng=np.random.default_rng(stats.SEED)).confidence_interval
    return [Comparison(label, GREATER, float(e), float(low), float(high), np.nan, f"bootstrap over {len(seeds)} seeds",
                       verdict(GREATER, low, high, 0.0), points=False)
            for label, e, low, high in zip(labels, estimates, *interval)]


def _larger_teachers(store: Store, frame: pd.DataFrame, cells: Cells, margin: float, confidence: float
                     ) -> tuple[list[Comparison], list[str]]:
    """Finding 6: CLIP-KD from each larger teacher against it from each smaller one (teacher sizes from the
    runs' teacher_params), one family."""
    teachers = sorted({t for t in frame.loc[frame["method"] == CLIP_KD, "teacher"].dropna()})
    with store.engine.connect() as connection:
        sizes = dict(connection.execute(select(Run.teacher, Run.teacher_params).distinct()
                                        .where(Run.teacher.in_(teachers), Run.teacher_params.is_not(None))).all())
    ordered = sorted((t for t in teachers if t in sizes), key=sizes.get)
    pairs = [(small, large) for i, small in enumerate(ordered) for large in ordered[i + 1:] if sizes[large] > sizes[small]]
    if not pairs:
        return [], ["CLIP-KD from a second, larger teacher"]
    found = cells.compare([(f"CLIP-KD: {large} − {small} ({sizes[large] / sizes[small]:.2f}× the weights)",
                            NO_NOTABLE_GAIN, (CLIP_KD, large), (CLIP_KD, small)) for small, large in pairs],
                          margin, confidence)
    return found, []


def grid_runs(store: Store, grid: str) -> set[str]:
    """The runs of a grid (``queries.grid_cells``); a grid the store does not know is refused, its grids named."""
    cells = grid_cells()
    with store.engine.connect() as connection:
        runs = set(connection.scalars(select(cells.c.run_id).where(cells.c.grid == grid)))
        if not runs:
            known = sorted(set(connection.scalars(select(cells.c.grid).distinct())))
            raise QueryError(f"grid {grid!r} has no runs in this store; its grids: {', '.join(known) or 'none'}")
    return runs


def findings(store: Store, benchmark: str | None = None, grid: str | None = None, margin: float = MARGIN,
             similarity: str = "cka_img", confidence: float = stats.CONFIDENCE) -> list[Finding]:
    """Every finding for each setting of the store (or of a grid's runs) with a baseline and distilled runs, on
    ``benchmark`` (default: ImageNet where stored, else the one with the most top-1 values)."""
    similarity = metric_name(similarity)
    if benchmark is not None and benchmark not in (stored := filter_options(store)["benchmark"]):
        raise QueryError(f"benchmark {benchmark!r} has no values in this store; its benchmarks: {', '.join(stored)}")
    frame = per_seed(store, [ACCURACY, similarity], benchmark)
    if grid is not None:
        frame = frame[frame["run_id"].isin(grid_runs(store, grid))]
    frame = frame.astype({c: object for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)})
    if frame.empty:
        return []
    if benchmark is None:
        counts = frame[frame["metric"] == ACCURACY]["benchmark"].value_counts()
        benchmark = "imagenet1k" if "imagenet1k" in counts else counts.index[0]
        frame = frame[frame["benchmark"] == benchmark]
    report = []
    for _, setting in frame.groupby("setting_id", sort=True):
        distilled = setting[setting["method"] != "baseline"]
        if not (setting["method"] == "baseline").any() or distilled.empty:
            continue
        methods = (distilled[distilled["method"].isin(list(NAMES))].groupby("teacher")["method"].nunique()
                   .sort_values(ascending=False, kind="stable"))
        if methods.empty:
            continue
        # each teacher with an ablation of its own gets the findings; the one with the most cells also the
        # comparison of teachers (finding 6)
        for teacher in [t for t, count in methods.items() if count >= ABLATION] or methods.index[:1]:
            cells = Cells(store, setting, benchmark, similarity, teacher)
            report += _setting_findings(store, setting, cells, margin, confidence, teachers_too=teacher == methods.index[0])
    return report


def _setting_findings(store: Store, frame: pd.DataFrame, cells: Cells, margin: float, confidence: float,
                      teachers_too: bool) -> list[Finding]:
    first = frame.iloc[0]
    setting = f"{first['student']} on {first['dataset']} ({cells.benchmark} top-1), teacher {cells.teacher}"
    table1 = table1_deltas()
    beats = [(m, "baseline", GREATER) for m in SINGLE]
    best = [("fd", m, GREATER) for m in SINGLE if m not in ("fd", "mfd")] + [("fd", "mfd", CLOSE)]
    complementary = [(FD_ICL, "fd", GREATER), (FD_ICL, "icl", GREATER)]
    crd_helps = [(CLIP_KD, FD_ICL, GREATER), ("crd+fd+gd+icl", CLIP_KD, NO_NOTABLE_GAIN),
                 ("afd+crd+fd+icl", CLIP_KD, NO_NOTABLE_GAIN)]
    claims = [
        ("Every distillation loss beats the baseline", beats,
         f"Table 1: +{min(table1[m] for m in SINGLE):.2f} (AFD) to +{max(table1[m] for m in SINGLE):.2f} (FD)"),
        ("FD is the best single loss; MFD is close to it", best,
         f"Table 1: FD +{table1['fd']:.2f}, MFD +{table1['mfd']:.2f}, the others +{table1['icl']:.2f} or less"),
        ("FD and ICL are complementary: FD+ICL beats FD and ICL alone", complementary, "§4.2"),
        ("Adding CRD to FD+ICL helps (CLIP-KD); adding GD or AFD brings no notable gain", crd_helps,
         f"§4.2; Table 1: CLIP-KD +{table1[CLIP_KD]:.2f}, the best"),
    ]
    report = []
    for number, (claim, pairs, paper) in enumerate(claims, start=1):
        comparisons, missing = _pairwise(cells, pairs, margin, confidence)
        report.append(Finding(number, claim, paper, setting, comparisons, missing))
    similarity = _similarity_follows(cells, confidence)
    report.append(Finding(5, "Accuracy follows teacher–student feature similarity", "§4.4", setting,
                          [similarity] if similarity else [], [] if similarity else ["distilled runs with similarity"]))
    if teachers_too:
        larger, missing = _larger_teachers(store, frame, cells, margin, confidence)
        report.append(Finding(6, "A larger teacher is not always a better one", "§4.3.4", setting, larger, missing,
                              any_of=True))
    ranks = _rank_agreement(cells, confidence)
    order = " > ".join(NAMES[m] for m in sorted(table1, key=table1.get, reverse=True))
    report.append(Finding(7, "The methods rank as in Table 1", f"Table 1: {order}", setting, ranks,
                          [] if ranks else ["three of Table 1's methods and the baseline"]))
    return report


def _stated(comparison: Comparison) -> str:
    number = "{:+.2f}" if comparison.points else "{:.2f}"
    interval = ("no interval" if np.isnan(comparison.low)
                else f"[{number.format(comparison.low)}, {number.format(comparison.high)}]")
    return f"{comparison.label} {number.format(comparison.estimate)} {interval}"


def summary(report: list[Finding]) -> pd.DataFrame:
    """One row per finding: what the paper reports, what this store measured, and the verdict."""
    return pd.DataFrame([{"finding": f"{f.number}. {f.claim}", "paper": f.paper,
                          "this store": "; ".join(map(_stated, f.comparisons))
                          or "missing: " + ", ".join(f.missing), "verdict": f.verdict} for f in report])


def details(report: list[Finding]) -> pd.DataFrame:
    """One row per comparison, every number in its own column (Δs in points of top-1)."""
    return pd.DataFrame([{"setting": f.setting, "finding": f.number, "claim": f.claim, "finding_verdict": f.verdict,
                          "comparison": c.label, "tested": c.claim, "estimate": c.estimate, "low": c.low,
                          "high": c.high, "p_adjusted": c.p, "test": c.test, "verdict": c.verdict}
                         for f in report for c in f.comparisons])


def legend(margin: float, confidence: float) -> str:
    return (f"Δ in points of top-1, paired by seed (t) or, for one seed, over test items (bootstrap); intervals at "
            f"{confidence:.0%} jointly within each finding (Bonferroni: each at 1 − {1 - confidence:.2f}/m for the "
            f"finding's m comparisons; p-values × m). Verdicts: 'greater' holds when the interval is above 0; "
            f"'close' when it lies within ±{margin * 100:g} point(s); 'no notable gain' when its top is below "
            f"+{margin * 100:g}; contradicted when the interval lies wholly on the other side; else unresolved at "
            f"this power. Correlations: Pearson's r with Fisher's z interval, rank correlations with a percentile "
            f"bootstrap over seeds.")


def render(report: list[Finding], fmt: str, margin: float = MARGIN, confidence: float = stats.CONFIDENCE) -> str:
    if not report:
        return ("no setting in this store has a no-KD baseline and distilled runs; run a grid with the paper's "
                "cells first (grids/demo_findings.yaml, grids/paper_ablation.yaml)\n")
    if fmt == "csv":
        return details(report).to_csv(index=False)
    if fmt == "json":
        return details(report).to_json(orient="records", indent=1) + "\n"
    out = []
    for setting in dict.fromkeys(f.setting for f in report):
        mine = [f for f in report if f.setting == setting]
        out.append(f"{setting}\n\n" + (summary(mine).to_markdown(index=False) if fmt == "markdown"
                                        else "\n\n".join(map(_block, mine))))
    return "\n\n".join(out) + f"\n\n{legend(margin, confidence)}\n"


def _block(finding: Finding) -> str:
    """A finding as a terminal reads it: the claim and verdict, the paper, then one line per comparison."""
    lines = [f"{finding.number}. {finding.claim}: {finding.verdict.upper()}", f"   paper: {finding.paper}"]
    lines += [f"   {_stated(c)}, p = {c.p:.3g}, {c.test}: {c.verdict}" if not np.isnan(c.p)
              else f"   {_stated(c)}, {c.test}: {c.verdict}" for c in finding.comparisons]
    if finding.missing:
        lines.append("   missing: " + ", ".join(finding.missing))
    return "\n".join(lines)
