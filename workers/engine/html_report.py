"""``report.html``: the same data as ``report.json``, readable in a browser, with figures.

One self-contained file (matplotlib figures embedded as SVG data URIs, no scripts, no external
assets): the final table per model (last / best / weight-averaged), the training curves
(loss, adversarial train accuracy, lr and training ε), the monitor's clean / FGSM / PGD
accuracy per epoch with distinct styles and markers and the catastrophic-overfitting events
marked, the method traces (ELLE's E_lin and λ, AAER's abnormal-example ratio, AWP's
perturbation norm, ADR's τ and λ, …), the watchdog's events and remediations, certified
accuracy against the radius as a step curve from the per-point radii of ``certify.tsv`` with
the ACR and the smoothed-PGD result, then timing, environment and the spec as run. Every line
has markers, so a one-epoch run shows its points; an evaluation-only job shows its tables.
Every value from the report is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

from bulwark.contract.export import eps_text
from bulwark.contract.report import Certification, HistoryRow, Report, as_report, probe_time

# the method traces a history row may carry, with a readable name (others are shown as named)
TRACES = {
    "elle_e_lin": "ELLE: E_lin", "elle_lambda": "ELLE: λ", "aaer_ratio": "AAER: abnormal ratio",
    "aaer_reg": "AAER: penalty", "gradalign_cos": "GradAlign: 1 − cos", "awp_norm": "AWP: ‖γv‖",
    "adr_tau": "ADR: τ", "adr_lambda": "ADR: λ_t", "adr_lambda_i": "ADR: mean λ_i",
    "loss_main": "loss without regularizers",
}
STYLES = {"clean": ("-", "o", "#1f77b4"), "FGSM": ("--", "s", "#ff7f0e"),
          "PGD": (":", "^", "#2ca02c"), "PGD (DLR)": ("-.", "v", "#9467bd")}


def epsilon_text(eps: float, norm: str) -> str:
    """ε as people write it, with its value: "8/255 (0.03137)" for ℓ∞ radii that are k/255."""
    text = eps_text(eps, norm)
    return f"{text} ({eps:.4g})" if "/" in text else f"{eps:.4g}"


def _esc(v: Any) -> str:
    if isinstance(v, float):
        return html.escape(f"{v:.4f}" if math.isfinite(v) else str(v))
    return html.escape(str(v))


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{th}</tr>{body}</table>"


# ---------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _plt().close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" '
            f'src="data:image/svg+xml;base64,{data}"></figure>')


def _acc_limits(values: list[float]) -> tuple[float, float]:
    """A y range that shows the data: not pinned to 0–1 when the runs sit in a narrow band."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    pad = max(0.05, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)


def _co_lines(ax, co_epochs: list[int], label: bool = True,
              recovered: list[int] | None = None) -> None:
    for i, e in enumerate(co_epochs):
        ax.axvline(e, color="#d62728", ls="--", lw=1.2,
                   label="catastrophic overfitting" if label and i == 0 else None)
    for i, e in enumerate(recovered or []):
        ax.axvline(e, color="#7f7f7f", ls="-.", lw=1.4,
                   label="recovered" if label and i == 0 else None)


def training_figure(hist: list[HistoryRow], co_epochs: list[int]) -> str:
    plt = _plt()
    ep = [h.epoch for h in hist]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(ep, [h.train_loss for h in hist], marker="o", color="#444")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(ep, [h.train_acc for h in hist], marker="o", color="#9467bd")
    axes[1].set(title="train accuracy (at the training attack)", xlabel="epoch",
                ylim=_acc_limits([h.train_acc for h in hist]))
    axes[2].plot(ep, [h.lr for h in hist], marker="o", color="#8c564b", label="lr")
    axes[2].set(title="lr and training ε", xlabel="epoch (value at its last step)")
    if any(h.train_epsilon is not None for h in hist):
        twin = axes[2].twinx()
        twin.plot(ep, [h.train_epsilon for h in hist], marker="s", ls="--",
                  color="#17becf", label="training ε")
        twin.set_ylabel("training ε")
        twin.set_ylim(bottom=0)
        lines = axes[2].get_lines() + twin.get_lines()
        axes[2].legend(lines, [ln.get_label() for ln in lines], fontsize=8,
                       loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    for ax in axes:
        _co_lines(ax, co_epochs, label=False)
        ax.grid(alpha=0.3)
        ax.set_xticks(ep if len(ep) <= 12 else ax.get_xticks())
    fig.tight_layout()
    return _img(fig, "training curves")


def monitor_figure(hist: list[HistoryRow], co_epochs: list[int],
                   recovered: list[int] | None = None) -> str:
    plt = _plt()
    rows = [(h.epoch, h.monitor) for h in hist if h.monitor is not None]
    if not rows:
        return ""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    values = []
    curves = [("clean", "clean_acc"), ("FGSM", "fgsm_acc"), ("PGD", "pgd_acc")]
    if any(m.dlr_acc is not None for _, m in rows):  # the gradient-masking check
        curves.append(("PGD (DLR)", "dlr_acc"))
    for name, key in curves:
        ls, marker, color = STYLES[name]
        ys = [getattr(m, key) for _, m in rows]
        values += ys
        ax.plot([e for e, _ in rows], ys, ls=ls, marker=marker, color=color, label=name,
                markersize=6 if name != "PGD" else 7)
    probes = [p for h in hist for p in h.probes]
    if probes:  # the checks within epochs: PGD on the probe slice, small markers
        ax.plot([probe_time(p) for p in probes], [p["pgd_acc"] for p in probes], ls="none",
                marker=".", color=STYLES["PGD"][2], alpha=0.6,
                label=f"PGD, probes ({probes[0].get('n')} images)")
        values += [p["pgd_acc"] for p in probes]
    _co_lines(ax, co_epochs, recovered=recovered)
    n = rows[0][1].n
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=_acc_limits(values),
           title=f"held-out monitor{f' ({n} images)' if n else ''}: clean, FGSM, PGD"
                 + (", PGD on DLR" if len(curves) > 3 else ""))
    ax.set_xticks([e for e, _ in rows] if len(rows) <= 12 else ax.get_xticks())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _img(fig, "monitor accuracy per epoch")


def traces_figure(hist: list[HistoryRow], co_epochs: list[int]) -> str:
    keys = sorted({k for h in hist for k in h.metrics},
                  key=lambda k: (k not in TRACES, list(TRACES).index(k) if k in TRACES else 0, k))
    if keys == ["loss_main"]:  # no regularizer: the same curve as the training loss
        keys = []
    if not hist or not keys:
        return ""
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.8 * rows), squeeze=False)
    ep = [h.epoch for h in hist]
    for ax, k in zip(axes.flat, keys, strict=False):
        ys = [h.metrics.get(k) for h in hist]
        ax.plot(ep, ys, marker="o", color="#333")
        pos = [y for y in ys if y is not None and y > 0]
        if k == "elle_e_lin" and pos and max(pos) / min(pos) > 100:
            ax.set_yscale("log")
        ax.set(title=TRACES.get(k, k), xlabel="epoch")
        ax.set_xticks(ep if len(ep) <= 12 else ax.get_xticks())
        _co_lines(ax, co_epochs, label=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _img(fig, "method traces (epoch means)")


def certified_points(certify_tsv: str | None) -> list[tuple[float, bool]]:
    """(radius, correct) per certified point from certify.tsv's text (abstentions: radius 0,
    not correct)."""
    if not certify_tsv:
        return []
    lines = [ln.split("\t") for ln in certify_tsv.strip().splitlines()]
    if not lines:
        return []
    head = lines[0]
    try:
        r, c = head.index("radius"), head.index("correct")
    except ValueError:
        return []
    out = []
    for cells in lines[1:]:
        try:
            out.append((float(cells[r]), cells[c].strip() in ("1", "True", "true")))
        except (IndexError, ValueError):
            continue
    return out


def certified_curve(points: list[tuple[float, bool]]) -> tuple[list[float], list[float]]:
    """The step curve: certified accuracy at r = the fraction of points that are correct with
    radius ≥ r, at r = 0 and at each correct point's radius (where the curve steps down)."""
    if not points:
        return [], []
    n = len(points)
    radii = sorted({0.0, *(r for r, ok in points if ok)})
    return radii, [sum(ok and rr >= r for rr, ok in points) / n for r in radii]


def certification_figure(cert: Certification, points: list[tuple[float, bool]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    xs, ys = certified_curve(points)
    if xs:
        x_end = max(xs) * 1.08 if max(xs) > 0 else 1.0
        ax.step(xs + [x_end], ys + [ys[-1]], where="post", color="#1f77b4",
                label=f"certified accuracy ({len(points)} points)")
    ax.plot(cert.radii, cert.certified_accuracy, ls="none", marker="o", color="#ff7f0e",
            label="at the report's radii")
    ax.set(xlabel="ℓ2 radius", ylabel="certified accuracy", ylim=(0, 1.02),
           title=f"randomized smoothing, σ = {cert.sigma:g}: ACR {cert.acr:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _img(fig, "certified accuracy against radius")


# ---------------------------------------------------------------------------------- the page
VERDICT_TEXT = {"robust": "Robust", "not_robust": "Not robust",
                "catastrophic_overfitting": "Catastrophic overfitting",
                "chance": "At chance: the model predicts about one class",
                "gradient_masking": "Gradient masking: the attacks disagree",
                "unverified": "Unverified: no multi-step attack was run"}


def _verdict_banner(rep: Report) -> str:
    """The verdict at the top of the page: what the job made (the job's state only says it
    ran). Green for robust, red otherwise."""
    v = rep.verdict
    if v is None:
        return ""
    return (f"<div class='verdict {'ok' if v.label == 'robust' else 'bad'}' "
            f"data-verdict='{_esc(v.label)}'><strong>Verdict: "
            f"{_esc(VERDICT_TEXT.get(v.label, v.label))}</strong> — {_esc(v.reason)}. "
            "<span class='note'>(The rule: docs/methods.md, \"Verdicts\".)</span></div>")


def _final_table(rep: Report) -> str:
    models = rep.models
    names = list(models)
    attacks = list(dict.fromkeys(a for res in models.values() for a in res.attacks))

    def acc(m: str, a: str) -> Any:
        return models[m].attacks[a].acc if a in models[m].attacks else "–"

    first = models[names[0]]
    rows = [("clean", *(models[m].clean_acc for m in names), first.n)]
    for a in attacks:
        rows.append((a, *(acc(m, a) for m in names),
                     first.attacks[a].n if a in first.attacks else "–"))
    head = ("accuracy", *(_model_label(rep, m) for m in names), "n")
    return _table(rows, head, "final")


def _model_label(rep: Report, name: str) -> str:
    """'best model (epoch 13)': the epoch each model's weights come from, where one does."""
    epoch = {"best": (rep.selection or {}).get("epoch"),
             "last": rep.history[-1].epoch if rep.history else None}.get(name)
    return f"{name} model" + (f" (epoch {epoch})" if epoch is not None else "")


def _warnings(rep: Report) -> str:
    """The final suite's own sanity checks (bulwark.contract.report.FinalResult.warnings)."""
    models = rep.models
    items = [f"{w}" + (f" ({name} model)" if len(models) > 1 else "")
             for name, res in models.items() for w in res.warnings(rep.reach)]
    return ("<ul class='co warnings'>" + "".join(f"<li>{_esc(w)}</li>" for w in items)
            + "</ul>") if items else ""


def _or_dash(v: Any) -> Any:
    return "–" if v is None else v


def render(report: Report | dict[str, Any], certify_tsv: str | None = None) -> str:
    """The page for ``report`` (``certify_tsv``: the text of the job's certify.tsv, for the
    certified-accuracy step curve)."""
    rep = as_report(report)
    spec, hist, events = rep.spec, rep.history, rep.events
    threat = spec["threat"]
    co_epochs, recovered = rep.co_epochs, rep.events_of("co_recovered")
    recipe = spec.get("recipe") or {}
    title = spec.get("name") or recipe.get("preset") or "job"
    sections = [
        f"<h1>Bulwark report: {html.escape(title)}</h1>",
        "<p class='meta'>"
        + " · ".join(html.escape(str(x)) for x in (
            spec["dataset"]["name"], spec["model"]["arch"],
            f"{threat['norm']} ε = {epsilon_text(threat['epsilon'], threat['norm'])}",
            f"preset {recipe.get('preset')}" if recipe.get("preset") else "no preset",
            f"mode {spec.get('mode', 'train')}",
            *([f"finished {rep.finished_at}"] if rep.finished_at else [])))
        + f" · report_version {_esc(rep.report_version)}</p>",
        _verdict_banner(rep),
        "<h2>Final evaluation" + (" on the validation slice (not the test set)"
                                  if rep.split == "validation" else "") + "</h2>",
        _final_table(rep),
        _warnings(rep)]
    if hist:
        sections += ["<h2>Training</h2>", training_figure(hist, co_epochs),
                     "<h2>Robustness per epoch</h2>", monitor_figure(hist, co_epochs,
                                                                      recovered)]
        traces = traces_figure(hist, co_epochs)
        if traces:
            sections += ["<h2>Method traces</h2>", traces]
    elif spec.get("mode") == "evaluate":
        sections.append("<p class='note'>An evaluation-only job: no training history.</p>")
    else:
        sections.append("<p class='note'>No epoch was trained (resumed at the end, or stopped "
                        "before the first epoch finished).</p>")
    if co_epochs:
        sections.append("<p class='co'>Catastrophic overfitting at epoch(s) "
                        + ", ".join(str(e) for e in co_epochs) + " (red dashed lines)"
                        + ("; recovered at epoch(s) " + ", ".join(map(str, recovered))
                           + " (grey dash-dot lines)" if recovered else "")
                        + ("; still overfit at the last epoch" if rep.co_at_end else "")
                        + ".</p>")
    closed = rep.events_of("fgsm_pgd_gap_closed")
    for kind, css, lead, text in (
            ("fgsm_pgd_gap", "note", "An FGSM-PGD gap was recorded at",
             (" and closed at epoch(s) " + ", ".join(map(str, closed)) if closed else "")
             + ": PGD accuracy far under FGSM's, common early in single-step training and "
             "often passing. Only a gap that persists while PGD accuracy does not rise and the "
             "training attack has stopped working is catastrophic overfitting (docs/methods.md, "
             "\"The watchdog\")"),
            ("under_training", "co", "Under-training from",
             ": the gap persisted while the single-step training attack still fooled the model "
             "(FGSM accuracy well under clean): it has not learned to resist even the attack "
             "it trains on (more epochs, a smaller step or a weaker regularizer), which is not "
             "catastrophic overfitting"),
            ("gradient_masking", "co", "Gradient masking suspected from",
             ": PGD on cross-entropy leaves more accuracy than the same PGD on the DLR loss (the "
             "purple dash-dot line), so cross-entropy's gradients mislead the attack; trust the "
             "lower figure and AutoAttack's")):
        epochs = [str(e) for e in rep.events_of(kind)]
        if epochs:
            sections.append(f"<p class='{css}'>{lead} epoch(s) {', '.join(epochs)}{text}.</p>")
    if events:
        sections += ["<h2>Watchdog events</h2>", _table(
            [(e.type, e.when, _or_dash(e.pgd_acc), _or_dash(e.dlr_acc), _or_dash(e.fgsm_acc),
              _or_dash(e.clean_acc)) for e in events],
            ("event", "when", "PGD", "PGD (DLR)", "FGSM", "clean"), "events")]
    if rep.remediations:
        sections += ["<h2>Remediations</h2>", _table(
            [(r["epoch"], r["remedy"], r["rolled_back_to"], r["recipe"])
             for r in rep.remediations],
            ("epoch", "remedy", "rolled back to", "recipe from then on"))]
    if rep.stopped_early:
        se = rep.stopped_early
        sections.append(f"<p class='co'>Training stopped early at epoch {_esc(se['epoch'])}: "
                        f"{_esc(se['reason'])}.</p>")
    if rep.selection:
        sel = rep.selection
        sections += ["<h2>Best and last epoch</h2>", _table(
            [(sel["epoch"], sel["monitor_pgd_acc"], sel["last_monitor_pgd_acc"],
              sel["robust_generalization_gap"])],
            ("best epoch", "best monitor PGD", "last monitor PGD", "gap"))]
    cert = rep.certification
    if cert:
        sections += [
            "<h2>Certified robustness (randomized smoothing)</h2>",
            f"<p>σ = {_esc(cert.sigma)}, n0 = {_esc(cert.n0)}, n = {_esc(cert.n)}, "
            f"α = {_esc(cert.alpha)}, {_esc(cert.num_points)} points; "
            f"ACR {cert.acr:.4f}, abstain rate {cert.abstain_rate:.4f}</p>",
            certification_figure(cert, certified_points(certify_tsv)),
            _table(list(zip(cert.radii, cert.certified_accuracy, strict=True)),
                   ("radius", "certified accuracy"))]
        if cert.empirical is not None:
            sections += ["<h3>Smoothed-classifier PGD (empirical)</h3>",
                         _table([(k, v) for k, v in cert.empirical.model_dump().items()
                                 if not isinstance(v, dict | list)], ("", "value"))]
    sections += ["<h2>Timing (s)</h2>",
                 _table(list(rep.timing.items()), ("phase", "seconds")),
                 "<h2>Environment</h2>", _table(list(rep.environment.items()), ("", "value")),
                 "<h2>Spec as run</h2>",
                 "<details><summary>the resolved spec (JSON), exactly as the job ran</summary>"
                 f"<pre>{html.escape(json.dumps(spec, indent=2))}</pre></details>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;"
             "color:#222}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}"
             ".co{color:#d62728;font-weight:600}.meta,.note{color:#555}"
             ".verdict{padding:.7em 1em;border-radius:6px;margin:1em 0}"
             ".verdict.ok{background:#e6f4ea;border:1px solid #2ca02c}"
             ".verdict.bad{background:#fdecea;border:1px solid #d62728}"
             "figure{margin:1em 0}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{style}</style></head><body>"
            + "\n".join(s for s in sections if s) + "</body></html>")
