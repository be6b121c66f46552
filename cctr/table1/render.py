"""Table 1, stage 4 (render): md / csv / tex tables, the bar chart and the figures, from records."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from cctr.atomic import atomic_file
from cctr.table1.collect import metric, per_case_dice
from cctr.table1.plan import CHECKPOINTS, REFERENCE, Table1Spec
from cctr.table1.stats import paired_tests


def _stats(vals: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def summarize(spec: Table1Spec, records: list[dict], class_names: tuple[str, ...]) -> list[dict]:
    """One row per (checkpoint, method, labeled): mean/std over seeds of every metric, the paired
    test against `cctr`, and the runs it comes from."""
    rows = []
    for ckpt, _ in CHECKPOINTS:
        tests = paired_tests(records, spec.methods, spec.labeled, ckpt)
        for m in spec.methods:
            for lab in spec.labeled:
                sel = [r for r in records if r["method"] == m and (r["labeled"] == lab or m == "full")
                       and r["status"] == "FINISHED"]
                row: dict[str, Any] = {"checkpoint": ckpt, "method": m, "labeled": lab,
                                       "n_seeds": len(sel), "seeds": " ".join(str(r["seed"]) for r in sel)}
                for name in ("dice", "hd95", "asd"):
                    mean, std, _ = _stats([metric(r, ckpt, name) for r in sel])
                    key = name if name == "dice" else f"{name}_mm"
                    row[f"{key}_mean"], row[f"{key}_std"] = mean, std
                for cls in class_names[1:]:
                    for name in ("dice", "hd95"):
                        mean, std, _ = _stats([metric(r, ckpt, name, cls) for r in sel])
                        key = name if name == "dice" else f"{name}_mm"
                        row[f"{key}_{cls}_mean"], row[f"{key}_{cls}_std"] = mean, std
                t = tests.get((m, lab), {})
                row["p_vs_cctr"] = t.get("p", float("nan"))
                row["p_vs_cctr_holm"] = t.get("p_holm", float("nan"))
                row["n_pairs"] = t.get("n_pairs", 0)
                row["dice_diff_vs_cctr"] = t.get("diff", float("nan"))
                rows.append(row)
    return rows


def _fmt(mean: float, std: float, n: int, digits: int, pm: str = " ± ") -> str:
    if not np.isfinite(mean):
        return "–"
    s = f"{mean:.{digits}f}"
    return s + (f"{pm}{std:.{digits}f}" if n > 1 and np.isfinite(std) else "")


def _fmt_p(p: float, latex: bool = False) -> str:
    if not np.isfinite(p):
        return "–"
    if p < 0.001:
        return "$<$0.001" if latex else "<0.001"
    return f"{p:.3f}"


def sanity_checks(spec: Table1Spec, rows: list[dict], ckpt: str = "best") -> list[str]:
    """Lines for the reader's first checks on mean test Dice: `full` at or above every row, and supervision
    at or below every semi-supervised row, at every labeled count. Each semi-supervised row is checked
    against the supervised row that predicts with the same nets (`sup`: both nets' ensemble; `sup-a`: net A
    alone, the one-net peers' baseline), so a one-net row is not held to a two-net ensemble. Violations are
    flagged, not hidden."""
    from cctr.terms import get_method

    sup_rows: dict[tuple[str, ...], str] = {}  # nets -> the first supervised-only row predicting with them
    for m in spec.methods:
        meth = get_method(m)
        if meth.terms == ("sup",) and meth.train and not meth.all_labeled:
            sup_rows.setdefault(meth.nets, m)
    base_of = {m: sup_rows.get(get_method(m).nets, sup_rows.get(("a", "b")))  # a row's floor: its nets' sup
               for m in spec.methods if get_method(m).unlabeled}
    lines = []
    for lab in spec.labeled:
        at = {r["method"]: r for r in rows if r["checkpoint"] == ckpt and r["labeled"] == lab}
        d = {m: r["dice_mean"] for m, r in at.items() if np.isfinite(r["dice_mean"])}
        if "full" in d:
            bad = [m for m in d if m != "full" and d[m] > d["full"]]
            lines.append(f"- {lab} labeled: `full` ({d['full']:.3f}) is at or above every other row: "
                         + ("yes" if not bad else "**NO** — " + ", ".join(f"`{m}` {d[m]:.3f}" for m in bad)))
        for nets, base in sup_rows.items():
            semi = [m for m, b in base_of.items() if b == base and m in d]
            if base not in d or not semi:
                continue
            bad = [m for m in semi if d[m] < d[base]]
            lines.append(f"- {lab} labeled: `{base}` ({d[base]:.3f}) is at or below every semi-supervised row "
                         f"predicting with {_nets_words(nets)} ({', '.join(f'`{m}`' for m in semi)}): "
                         + ("yes" if not bad else "**NO** — " + ", ".join(f"`{m}` {d[m]:.3f}" for m in bad)))
    return lines


def _nets_words(nets: tuple[str, ...]) -> str:
    return "net A alone" if nets == ("a",) else "both nets' ensemble"


def _labeled_sets(spec: Table1Spec, records: list[dict]) -> list[str]:
    lines = []
    for s in spec.seeds:
        parts = []
        for lab in spec.labeled:
            r = next((r for r in records if r["seed"] == s and r["labeled"] == lab and r.get("labeled_cases")), None)
            if r is not None:
                parts.append(f"{lab}: {r['labeled_cases'].replace(',', ', ')}")
        if parts:
            lines.append(f"- seed {s}: " + "; ".join(parts))
    return lines


def _n_test_cases(records: list[dict]) -> int:
    for r in records:
        if r["status"] == "FINISHED":
            n = len(per_case_dice(r, "best"))
            if n:
                return n
    return 0


def _intro(spec: Table1Spec, dataset: str, records: list[dict], n_tests: int) -> str:
    from cctr.terms import get_method

    n = len(spec.seeds)
    seeds = (f"mean ± sample std (ddof=1) over {n} seeds, {n} runs per cell" if n > 1
             else "one seed, one run per cell (no spread)")
    one = [m for m in spec.methods if get_method(m).train and get_method(m).nets == ("a",)]
    pred = "prediction: both nets' ensemble"
    if one:
        pred += f", net A alone for {', '.join(f'`{m}`' for m in one)}"
    if "reg-only" in spec.methods:
        pred += ", registration for `reg-only`"
    return (f"{dataset}, {spec.preset} preset; test set ({_n_test_cases(records)} cases), {pred}; "
            f"{seeds}. A seed s sets the training seed and which training cases are labeled "
            f"(data.labeled_seed = s; labeled sets nested within a seed); the train/val/test split is fixed "
            f"(data.seed), so every run is tested on the same cases. `full` uses every training label, is trained "
            f"once per seed and repeated in every column. "
            + (f"p: two-sided paired Wilcoxon signed-rank test against `cctr` at the same labeled count over "
               f"(seed, test case) pairs of per-case mean foreground Dice, Holm-corrected across the {n_tests} "
               f"methods compared at each labeled count (per checkpoint)." if n_tests else
               "No paired test: the grid has no `cctr` row to test against."))


def _markdown(spec: Table1Spec, dataset: str, rows: list[dict], records: list[dict]) -> str:
    n_tests = len([m for m in spec.methods if m != REFERENCE]) if REFERENCE in spec.methods else 0
    lines = [f"# Table 1 — {dataset} ({spec.preset} preset, {len(spec.seeds)} seed(s))", "",
             _intro(spec, dataset, records, n_tests), "",
             "Dice: mean foreground Dice (higher is better); HD95 in mm (lower is better); "
             "p: Holm-adjusted p-value vs `cctr` (raw p in the CSV).", ""]
    for ckpt, title in CHECKPOINTS:
        lines += [f"## {title[0].upper() + title[1:]}", "",
                  "| method | " + " | ".join(f"{lab} labeled: Dice | HD95 (mm) | p" for lab in spec.labeled) + " |",
                  "|---|" + "---|---|---|" * len(spec.labeled)]
        for m in spec.methods:
            cellsx = []
            for lab in spec.labeled:
                r = next(r for r in rows if r["checkpoint"] == ckpt and r["method"] == m and r["labeled"] == lab)
                if r["n_seeds"] == 0:
                    cellsx.append("not run | – | –")
                    continue
                short = "" if r["n_seeds"] == len(spec.seeds) else f" ({r['n_seeds']}/{len(spec.seeds)} seeds)"
                cellsx.append(f"{_fmt(r['dice_mean'], r['dice_std'], r['n_seeds'], 3)}{short} | "
                              f"{_fmt(r['hd95_mm_mean'], r['hd95_mm_std'], r['n_seeds'], 2)} | "
                              + ("ref." if m == REFERENCE else _fmt_p(r["p_vs_cctr_holm"])))
            lines.append(f"| {m} | " + " | ".join(cellsx) + " |")
        checks = sanity_checks(spec, rows, ckpt) or ["- not applicable: the grid has no `full` or no `sup` row"]
        lines += ["", f"Sanity checks ({title}, mean test Dice):", ""] + checks + [""]
    failed = [r for r in records if r["status"] != "FINISHED"]
    if failed:
        lines += ["## Cells without a finished run", ""] + [
            f"- {r['method']} l={r['labeled']} seed={r['seed']}: {r['status']}"
            + (f" ({r['error']})" if r.get("error") else "") for r in failed] + [""]
    ls = _labeled_sets(spec, records)
    if ls:
        lines += ["## Labeled training cases per seed", ""] + ls + [""]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    """Plain text to LaTeX (no backslashes expected in it); ± and backticks become math and nothing."""
    for x, y in (("&", "\\&"), ("%", "\\%"), ("#", "\\#"), ("_", "\\_"), ("{", "\\{"), ("}", "\\}"),
                 ("`", ""), ("±", "$\\pm$")):
        s = s.replace(x, y)
    return s


def _latex(spec: Table1Spec, dataset: str, rows: list[dict], records: list[dict]) -> str:
    """A booktabs table (needs only \\usepackage{booktabs}); both checkpoints as two row blocks."""
    L = len(spec.labeled)
    ncol = 1 + 3 * L
    n_tests = len([m for m in spec.methods if m != REFERENCE]) if REFERENCE in spec.methods else 0
    out = [f"% Table 1 — {_tex_escape(dataset)}, written by cctr (results/table1_*.tex); needs \\usepackage{{booktabs}}",
           "\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{{_tex_escape(_intro(spec, dataset, records, n_tests))} "
           f"Dice: mean foreground Dice ($\\uparrow$); HD95 in mm ($\\downarrow$); $p$: Holm-adjusted.}}",
           f"\\label{{tab:table1-{_tex_escape(dataset)}}}",
           "\\begin{tabular}{l" + "ccc" * L + "}", "\\toprule",
           " & " + " & ".join(f"\\multicolumn{{3}}{{c}}{{{lab} labeled}}" for lab in spec.labeled) + " \\\\",
           " ".join(f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(L)),
           "Method & " + " & ".join("Dice & HD95 (mm) & $p$" for _ in spec.labeled) + " \\\\"]
    for ckpt, title in CHECKPOINTS:
        out += ["\\midrule", f"\\multicolumn{{{ncol}}}{{l}}{{\\emph{{{title[0].upper() + title[1:]}}}}} \\\\"]
        for m in spec.methods:
            cellsx = []
            for lab in spec.labeled:
                r = next(r for r in rows if r["checkpoint"] == ckpt and r["method"] == m and r["labeled"] == lab)
                if r["n_seeds"] == 0:
                    cellsx += ["--", "--", "--"]
                    continue
                cellsx += [_fmt(r["dice_mean"], r["dice_std"], r["n_seeds"], 3, "$\\pm$").replace("–", "--"),
                           _fmt(r["hd95_mm_mean"], r["hd95_mm_std"], r["n_seeds"], 2, "$\\pm$").replace("–", "--"),
                           "ref." if m == REFERENCE else _fmt_p(r["p_vs_cctr_holm"], latex=True).replace("–", "--")]
            out.append(f"{_tex_escape(m)} & " + " & ".join(cellsx) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                            ("" if isinstance(v, float) else v)) for k, v in r.items()})


def write_table(spec: Table1Spec, records: list[dict], dataset: str, class_names: tuple[str, ...],
                out_dir: Path = Path("results"), figures: bool = True) -> dict[str, Path]:
    """results/table1_<dataset>.{md,csv,tex,png} (+ `_runs.csv`, one row per run), and with
    `figures` the qualitative and pseudo-label figures. Returns the paths by kind."""
    from cctr.report import table1_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(spec, records, class_names)
    base = out_dir / f"table1_{dataset.replace('-', '_')}"
    _write_csv(base.with_suffix(".csv"), rows)
    run_rows = [{k: v for k, v in r.items() if not k.startswith(("val_", "loss", "lr", "pl_", "iteration"))}
                for r in records]
    keys = list(dict.fromkeys(k for r in run_rows for k in r))
    runs_csv = base.with_name(base.name + "_runs.csv")
    _write_csv(runs_csv, [{k: r.get(k, "") for k in keys} for r in run_rows])
    with atomic_file(base.with_suffix(".md")) as tmp:
        tmp.write_text(_markdown(spec, dataset, rows, records))
    with atomic_file(base.with_suffix(".tex")) as tmp:
        tmp.write_text(_latex(spec, dataset, rows, records))
    best = [{"method": r["method"], "labeled": r["labeled"], "test_dice_mean": r["dice_mean"],
             "test_dice_std": r["dice_std"] if np.isfinite(r["dice_std"]) else 0.0}
            for r in rows if r["checkpoint"] == "best" and r["n_seeds"] > 0]
    fig = table1_figure(best, spec.methods, spec.labeled, base.with_suffix(".png"))
    files = {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv"), "tex": base.with_suffix(".tex"),
             "png": fig, "runs_csv": runs_csv}
    if figures:
        from cctr import table_figures as tf

        q = tf.qualitative_figure(spec, records, dataset, base.with_name(base.name + "_qualitative.png"))
        if q is not None:
            files["qualitative"] = q
        p = tf.pseudo_label_figure(spec, records, base.with_name(base.name + "_pseudo_labels.png"))
        if p is not None:
            files["pseudo_labels"] = p
    _log_to_parent(spec, dataset, files)
    return files


def _log_to_parent(spec: Table1Spec, dataset: str, files: dict[str, Path]) -> None:
    """The written table and figures become artifacts (`table1/`) of the table's parent run."""
    from cctr import tracking

    parents = tracking.find_runs(dataset, f"tags.table1 = '{spec.name}' and tags.role = 'table'")
    if not parents:
        return
    run = tracking.Run(parents[0].info.run_id)
    for path in files.values():
        run.log_artifact(path, "table1")
