"""``bulwark compare``: a sweep's runs side by side — ``compare.json`` and ``compare.html``.

Runs are pooled as seeds only when their resolved specs are equal apart from the seed (a
digest, ``bulwark.contract.sweep.pool_key``); each pool is a row per ε, named by its method (the
sweep variant, else the recipe preset, with any other grid field the run set) and, where two pools
share a method, by the spec fields they differ in. Each row has the mean ± std over its seeds
of clean, PGD and AutoAttack accuracy, of seconds per epoch and of training seconds (the
median epoch × the epochs: a paused epoch does not count), how many of its runs the watchdog
flagged for catastrophic overfitting (CO) and how many were still overfit at their last epoch
(the others recovered). The page is self-contained: one table and three matplotlib figures
embedded as SVG data URIs (robust accuracy against ε per method with the runs still overfit
at their end marked, clean against robust accuracy per run, seconds per epoch per method); an
error bar is drawn only over two runs or more and never leaves [0, 1]. Every string from a
run is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

COMPARE_JSON, COMPARE_HTML = "compare.json", "compare.html"
METRICS = ("clean_acc", "pgd_acc", "autoattack_acc", "seconds_per_epoch", "train_seconds")


# grid fields a method is measured over; any other grid field makes another method
_ACROSS = {"variant", "schedule.seed", "threat.epsilon"}


def _value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def method_of(row: dict[str, Any]) -> str:
    """The sweep variant (else the recipe preset), with every other grid field the run set
    (``lam0.1 models=best``), so that runs differing in more than seed and ε never share a row."""
    ov = row.get("overrides") or {}
    parts = [str(ov["variant"])] if ov.get("variant") else []
    parts += [_value(v) if k == "recipe.preset" else f"{k.rsplit('.', 1)[-1]}={_value(v)}"
              for k, v in ov.items() if k not in _ACROSS]
    return " ".join(parts) or str(row.get("preset") or row["name"])


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each pool's row label: its method, and where two pools share a method at one ε, the
    spec fields their runs differ in (``n-aaer epochs=5 train_limit=20000``; ``#2`` when the
    rows carry no spec). A pool is the runs whose resolved specs are equal apart from the seed
    (``bulwark.contract.sweep.pool_key``): only those are seeds of one method."""
    from bulwark.contract.sweep import POOL_APART, flat_fields

    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        first.setdefault(_pool(r), r)
    clash: dict[tuple[str, Any], list[str]] = {}
    for pool, r in first.items():
        clash.setdefault((method_of(r), r.get("epsilon")), []).append(pool)
    out = {}
    for (method, _eps), pools in clash.items():
        if len(pools) == 1:
            out[pools[0]] = method
            continue
        flats = {p: flat_fields(first[p].get("spec") or {}) for p in pools}
        keys = sorted({k for f in flats.values() for k in f} - set(POOL_APART))
        varying = [k for k in keys if len({repr(f.get(k)) for f in flats.values()}) > 1]
        for i, p in enumerate(pools, start=1):
            diff = " ".join(f"{k.rsplit('.', 1)[-1]}={_value(flats[p].get(k))}"
                            for k in varying)
            out[p] = f"{method} {diff}" if diff else f"{method} #{i}"
    return out


def _pool(row: dict[str, Any]) -> str:
    """The row's pool: its method and its spec digest (a row from before digests: its method
    alone). Runs named apart (two `bulwark run` folders, two sweep variants) stay apart even
    where their specs agree."""
    return f"{method_of(row)}|{row.get('pool') or ''}"


def groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per pool (runs whose resolved specs differ in the seed alone) and ε over the
    finished runs: methods in first-seen order, each method's ε ascending. A run that differs
    in anything else — the training set, the epochs, a regularizer's weight — is another row,
    labelled by what differs, never another seed."""
    done = [r for r in rows if r.get("state") == "succeeded"]
    names = labels(done)
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in done:
        g = out.setdefault((_pool(r), r.get("epsilon")), {
            "method": names[_pool(r)], "epsilon": r.get("epsilon"), "runs": [], "seeds": []})
        g["runs"].append(r["name"])
        g["seeds"].append(r.get("seed"))
    for (pool, _eps), g in out.items():
        runs = [r for r in done if _pool(r) == pool and r["name"] in g["runs"]]
        for m in METRICS:
            g[m], g[m + "_std"] = _mean_std([r.get(m) for r in runs])
        g["co_runs"] = sum(bool(r.get("co_epochs")) for r in runs)
        g["co_end_runs"] = sum(bool(r.get("co_at_end")) for r in runs)
        g["n"] = len(runs)
    first = {m: i for i, m in enumerate(dict.fromkeys(g["method"] for g in out.values()))}
    return sorted(out.values(), key=lambda g: (
        first[g["method"]], g["epsilon"] is None, g["epsilon"] if g["epsilon"] is not None else 0))


def bounded(mean: float, std: float | None, top: float | None = 1.0) -> tuple[float, float]:
    """An error bar's (below, above) lengths: the std, cut so the bar stays in [0, top]."""
    std = std or 0.0
    return min(std, mean), std if top is None else min(std, max(top - mean, 0.0))


def _yerr(gs: list[dict[str, Any]], key: str, top: float | None = 1.0) -> list[list[float]]:
    """Matplotlib's asymmetric error bars for ``key`` over groups: none for a single run."""
    bars = [bounded(g[key], g[key + "_std"] if g["n"] > 1 else 0.0, top) for g in gs]
    return [[b for b, _ in bars], [a for _, a in bars]]


def by_epsilon(grouped: list[dict[str, Any]]) -> tuple[list[Any], list[tuple[str, dict]]]:
    """Robust accuracy against ε as a grid: the ε values (ascending) and, per method, its
    groups keyed by ε (a method lacks the ε it has no finished run at)."""
    eps = sorted({g["epsilon"] for g in grouped if g["epsilon"] is not None})
    methods = dict.fromkeys(g["method"] for g in grouped)
    return eps, [(m, {g["epsilon"]: g for g in grouped if g["method"] == m}) for m in methods]


def _pgd_cell(g: dict[str, Any] | None) -> str:
    """A grid cell: mean PGD accuracy (± std over seeds, and the run count, where there is more
    than one run), then how many of its runs were still overfit at their end."""
    if g is None or g["pgd_acc"] is None:
        return "–"
    text = f"{g['pgd_acc']:.3f}"
    if g["n"] > 1:
        text += (f" ± {g['pgd_acc_std']:.3f}" if g["pgd_acc_std"] else "") + f" ({g['n']} runs)"
    if g["co_end_runs"]:
        text += " CO" if g["co_end_runs"] == g["n"] else f" CO {g['co_end_runs']}/{g['n']}"
    return text


def _svg(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def cost_groups(grouped: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The ε whose seconds per epoch the cost figure draws, and its groups: the ε most methods
    ran at (then the most runs). Runs of one ε ran side by side under one load; pooling every
    ε would mix loads, and ε does not change what a step costs."""
    timed = [g for g in grouped if g["seconds_per_epoch"] is not None]
    ref = max(dict.fromkeys(g["epsilon"] for g in timed), default=None,
              key=lambda e: (sum(g["epsilon"] == e for g in timed),
                             sum(g["n"] for g in timed if g["epsilon"] == e)))
    return ref, [g for g in timed if g["epsilon"] == ref]


def figures(rows: list[dict[str, Any]], grouped: list[dict[str, Any]]) -> dict[str, str]:
    """The three figures as data URIs (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("state") == "succeeded"]
    names = labels(done)
    label = {r["name"]: names[_pool(r)] for r in done}
    methods = list(dict.fromkeys(g["method"] for g in grouped))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    out = {}

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    co = [r for r in done if r.get("co_at_end") and r.get("pgd_acc") is not None]
    if len({g["epsilon"] for g in grouped}) > 1:
        for m in methods:
            gs = sorted((g for g in grouped if g["method"] == m and g["pgd_acc"] is not None),
                        key=lambda g: g["epsilon"] or 0)
            if gs:
                ax.errorbar([g["epsilon"] for g in gs], [g["pgd_acc"] for g in gs],
                            yerr=_yerr(gs, "pgd_acc"), marker="o", capsize=3,
                            label=m, color=colors[m])
        if co:
            ax.scatter([r["epsilon"] for r in co], [r["pgd_acc"] for r in co], marker="x",
                       s=70, color="#d62728", zorder=5, label="run overfit at its end")
        ax.set(xlabel="ε", title="Robust accuracy against ε (mean ± std over seeds)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes
    else:  # one ε: a bar per method, every run a dot, CO runs a red cross
        gs = [g for g in grouped if g["pgd_acc"] is not None]
        xs = range(len(gs))
        ax.bar(xs, [g["pgd_acc"] for g in gs], yerr=_yerr(gs, "pgd_acc"),
               capsize=3, color=[colors[g["method"]] for g in gs], alpha=0.8)
        for x, g in zip(xs, gs, strict=True):
            runs = [r for r in done if label[r["name"]] == g["method"]
                    and r.get("pgd_acc") is not None]
            ax.scatter([x] * len(runs), [r["pgd_acc"] for r in runs], s=14, color="black",
                       zorder=4)
            bad = [r for r in runs if r.get("co_at_end")]
            ax.scatter([x] * len(bad), [r["pgd_acc"] for r in bad], marker="x", s=70,
                       color="#d62728", zorder=5)
        ax.set_xticks(list(xs), [g["method"] for g in gs], rotation=30, ha="right")
        eps = gs[0]["epsilon"] if gs else None
        ax.set(title=f"Robust accuracy at ε = {eps:g} (runs: dots; CO at end: red ×)"
               if isinstance(eps, float | int) else "Robust accuracy per method")
    ax.set(ylabel="PGD accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    out["robust_vs_epsilon"] = _svg(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m in methods:
        pts = [r for r in done if label[r["name"]] == m and r.get("pgd_acc") is not None]
        ax.scatter([r["clean_acc"] for r in pts], [r["pgd_acc"] for r in pts], label=m,
                   color=colors[m], marker="o")
    ax.set(xlabel="clean accuracy", ylabel="PGD accuracy", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title="Clean against robust accuracy (one point a run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out["clean_vs_robust"] = _svg(fig)

    ref, per = cost_groups(grouped)
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.4 * max(len(per), 1)))
    ax.barh([g["method"] for g in per], [g["seconds_per_epoch"] for g in per],
            xerr=_yerr(per, "seconds_per_epoch", top=None),
            color=[colors[g["method"]] for g in per])
    ax.invert_yaxis()
    where = f" at ε = {ref:g}" if isinstance(ref, float | int) else ""
    ax.set(xlabel="seconds per epoch (training only; a run's median epoch)",
           title=f"Cost per epoch{where} (mean ± std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    out["seconds_per_epoch"] = _svg(fig)
    return out


def _cell(v: Any, std: Any = None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return html.escape(f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if std else ""))
    return html.escape(str(v))


def render(rows: list[dict[str, Any]], title: str) -> str:
    grouped = groups(rows)
    figs = figures(rows, grouped) if grouped else {}
    head = ("<tr><th>method</th><th>ε</th><th>runs</th><th>clean</th><th>PGD</th>"
            "<th>AutoAttack</th><th>CO runs</th><th>CO at end</th><th>s/epoch</th>"
            "<th>train s</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(g['method'])}</td><td>{_cell(g['epsilon'])}</td>"
        f"<td>{g['n']}</td><td>{_cell(g['clean_acc'], g['clean_acc_std'])}</td>"
        f"<td>{_cell(g['pgd_acc'], g['pgd_acc_std'])}</td>"
        f"<td>{_cell(g['autoattack_acc'], g['autoattack_acc_std'])}</td>"
        f"<td class='{'co' if g['co_runs'] else ''}'>{g['co_runs']} / {g['n']}</td>"
        f"<td class='{'co' if g.get('co_end_runs') else ''}'>{g.get('co_end_runs', 0)} / "
        f"{g['n']}</td>"
        f"<td>{_cell(g['seconds_per_epoch'], g['seconds_per_epoch_std'], 1)}</td>"
        f"<td>{_cell(g['train_seconds'], g['train_seconds_std'], 0)}</td></tr>"
        for g in grouped)
    eps, methods = by_epsilon(grouped)
    eps_html = ("<h2>PGD accuracy against ε</h2><div class='wide'><table><tr><th>method</th>"
                + "".join(f"<th>ε = {e:g}</th>" for e in eps) + "</tr>" + "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(
            f"<td class='{'co' if (at.get(e) or {}).get('co_end_runs') else ''}'>"
            f"{html.escape(_pgd_cell(at.get(e)))}</td>" for e in eps) + "</tr>"
        for m, at in methods) + "</table></div>") if len(eps) > 1 else ""
    flagged = [r for r in rows if r.get("warnings")]
    warn_html = ("<h2>Attacks that disagree</h2><p>A stronger attack found much more than a "
                 "weaker one (gradient masking?): quote the stronger figure.</p><ul>" + "".join(
                     f"<li class='co'>{html.escape(r['name'])}: {html.escape(w)}</li>"
                     for r in flagged for w in r["warnings"]) + "</ul>") if flagged else ""
    failed = [r for r in rows if r.get("state") == "failed"]
    failed_html = ("<h2>Failed runs</h2><ul>" + "".join(
        f"<li>{html.escape(r['name'])}: {html.escape(str(r.get('error')))}</li>"
        for r in failed) + "</ul>") if failed else ""
    imgs = "".join(f'<figure><img alt="{html.escape(k)}" src="{v}"></figure>'
                   for k, v in figs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
        color: #222; }}
.wide {{ overflow-x: auto; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: .95em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3em .55em; text-align: right;
          white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
td.co, li.co {{ color: #d62728; font-weight: 600; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} runs; accuracies are mean ± std over the seeds of each method and ε; "CO runs"
counts the runs the watchdog flagged for catastrophic overfitting at some epoch, "CO at end"
those still overfit at their last epoch (the rest recovered); "train s" is a run's training
time, its median epoch × its epochs (evaluation and pauses left out).</p>
<div class="wide"><table>{head}{body}</table></div>
{eps_html}
{warn_html}
{imgs}
{failed_html}
</body></html>
"""


def markdown(rows: list[dict[str, Any]]) -> str:
    """The per-method-and-ε table in Markdown (what docs/experiments.md quotes): mean ± std over
    the seeds, the seeds' PGD figures one by one, CO counts, seconds per epoch, training
    seconds."""
    def cell(v: Any, std: Any = None, digits: int = 3) -> str:
        if v is None:
            return "–"
        return f"{v:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")

    lines = ["| method | ε | runs | clean | PGD | PGD per seed | AutoAttack | CO runs | "
             "CO at end | s / epoch | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    done = {r["name"]: r for r in rows if r.get("state") == "succeeded"}
    for g in groups(rows):
        per_seed = " / ".join(cell(done[n].get("pgd_acc")) for n in g["runs"])
        lines.append(
            f"| {g['method']} | {cell(g['epsilon'], digits=2) if g['epsilon'] is not None else '–'}"
            f" | {g['n']} | {cell(g['clean_acc'], g['clean_acc_std'])} | "
            f"{cell(g['pgd_acc'], g['pgd_acc_std'])} | {per_seed} | "
            f"{cell(g['autoattack_acc'], g['autoattack_acc_std'])} | {g['co_runs']} / {g['n']} | "
            f"{g['co_end_runs']} / {g['n']} | "
            f"{cell(g['seconds_per_epoch'], g['seconds_per_epoch_std'], 1)} | "
            f"{cell(g['train_seconds'], g['train_seconds_std'], 0)} |")
    flagged = [(r["name"], w) for r in rows for w in r.get("warnings") or []]
    if flagged:
        lines += ["", "Attacks that disagree (gradient masking?):"]
        lines += [f"- {name}: {w}" for name, w in flagged]
    return "\n".join(lines)


def epsilon_markdown(rows: list[dict[str, Any]]) -> str:
    """PGD accuracy against ε, a row per method and a column per ε (empty where the runs have
    one ε only); "CO" marks cells whose runs were still overfit at their last epoch."""
    eps, methods = by_epsilon(groups(rows))
    if len(eps) < 2:
        return ""
    lines = ["| method | " + " | ".join(f"ε = {e:g}" for e in eps) + " |",
             "|---|" + "---|" * len(eps)]
    lines += [f"| {m} | " + " | ".join(_pgd_cell(at.get(e)) for e in eps) + " |"
              for m, at in methods]
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    """``compare.json`` (runs, without their specs, and groups) and ``compare.html``."""
    out.mkdir(parents=True, exist_ok=True)
    j, h = out / COMPARE_JSON, out / COMPARE_HTML
    j.write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "spec"}
                                      for r in rows], "groups": groups(rows)}, indent=2))
    h.write_text(render(rows, title))
    return j, h
