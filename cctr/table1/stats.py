"""Table 1 statistics: paired Wilcoxon signed-rank tests against `cctr`, Holm-corrected."""

from __future__ import annotations

import numpy as np

from cctr.table1.collect import per_case_dice
from cctr.table1.plan import REFERENCE


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p of x vs y (pairs with a NaN dropped; zero differences
    dropped, scipy's zero_method='wilcox'); 1.0 when every difference is zero, NaN with no pairs."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return float("nan")
    if np.all(x == y):
        return 1.0
    return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvals: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaNs stay NaN and do
    not count as tests."""
    p = np.asarray(pvals, float)
    out = np.full(len(p), np.nan)
    idx = [i for i in np.argsort(p, kind="stable") if np.isfinite(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_tests(records: list[dict], methods: list[str], labeled: list[int], ckpt: str,
                 reference: str = REFERENCE) -> dict[tuple[str, int], dict]:
    """(method, labeled) -> {p, p_holm, n_pairs, diff}: every method against `reference` at the same
    labeled count over (seed, test case) pairs of per-case mean foreground Dice; Holm across the
    methods of each labeled count. `full` (one run per seed) is paired with every labeled count."""
    cache: dict[str, dict[str, float]] = {}

    def cases_of(rec):
        key = f"{rec['run_id']}:{ckpt}"
        if key not in cache:
            cache[key] = per_case_dice(rec, ckpt)
        return cache[key]

    out: dict[tuple[str, int], dict] = {}
    if reference not in methods:
        return out
    for lab in labeled:
        ref = {r["seed"]: r for r in records if r["method"] == reference and r["labeled"] == lab
               and r["status"] == "FINISHED"}
        keys, ps = [], []
        for m in methods:
            if m == reference:
                continue
            xs, ys = [], []
            for r in records:
                if r["method"] != m or r["status"] != "FINISHED" or (m != "full" and r["labeled"] != lab):
                    continue
                if r["seed"] not in ref:
                    continue
                a, b = cases_of(r), cases_of(ref[r["seed"]])
                for c in sorted(set(a) & set(b)):
                    xs.append(a[c])
                    ys.append(b[c])
            x, y = np.array(xs, float), np.array(ys, float)
            ok = np.isfinite(x) & np.isfinite(y)
            p = wilcoxon_p(x, y)
            out[(m, lab)] = {"p": p, "n_pairs": int(ok.sum()),
                             "diff": float(np.mean(x[ok] - y[ok])) if ok.any() else float("nan")}
            keys.append((m, lab))
            ps.append(p)
        for k, ph in zip(keys, holm(ps)):
            out[k]["p_holm"] = ph
            out[k]["n_tests"] = int(np.isfinite(ps).sum())
    return out
