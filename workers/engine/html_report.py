"""``report.html``: the same data as ``report.json``, readable in a browser, with plots.

Self-contained (inline SVG, no scripts, no external assets): training loss and accuracy per
epoch, monitor clean / FGSM / PGD accuracy per epoch with catastrophic-overfitting markers,
and certified accuracy against the radius when the job certified. Every value is escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any

W, H, PAD = 560, 220, 40
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def line_chart(title: str, xs: list[float], series: dict[str, list[float | None]], *,
               y_max: float | None = None, markers: list[float] = (),
               x_label: str = "epoch") -> str:
    """An SVG line chart; ``markers`` draws vertical red lines at those x values."""
    values = [v for ys in series.values() for v in ys if v is not None]
    if not xs or not values:
        return ""
    x0, x1 = min(xs), max(xs)
    y1 = y_max if y_max is not None else max(values) or 1.0
    y0 = min(0.0, min(values))
    sx = (W - 2 * PAD) / ((x1 - x0) or 1.0)
    sy = (H - 2 * PAD) / ((y1 - y0) or 1.0)

    def pt(x: float, y: float) -> str:
        return f"{PAD + (x - x0) * sx:.1f},{H - PAD - (y - y0) * sy:.1f}"

    parts = [f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">'
             f'{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
             f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end" font-size="10">'
             f'{y0:.2f}</text>',
             f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end" font-size="10">'
             f'{y1:.2f}</text>',
             f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="10">'
             f'{html.escape(x_label)} ({x0:g} … {x1:g})</text>']
    for m in markers:
        parts.append(f'<line class="co-marker" x1="{PAD + (m - x0) * sx:.1f}" y1="{PAD}" '
                     f'x2="{PAD + (m - x0) * sx:.1f}" y2="{H - PAD}" stroke="#d62728" '
                     f'stroke-dasharray="4 3"/>')
    for i, (name, ys) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(pt(x, y) for x, y in zip(xs, ys, strict=True) if y is not None)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{W - PAD + 4}" y="{PAD + 14 * i}" font-size="10" '
                     f'fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(report: dict[str, Any]) -> str:
    spec, hist = report["spec"], report["history"]
    epochs = [h["epoch"] for h in hist]
    mon = [h["monitor"] or {} for h in hist]
    co_epochs = [e["epoch"] for e in report.get("events", [])
                 if e.get("type") == "catastrophic_overfitting"]
    title = spec.get("name") or (spec["recipe"].get("preset") or "job")
    sections = [f"<h1>Bulwark report: {html.escape(title)}</h1>",
                f"<p>{html.escape(spec['dataset']['name'])} · {html.escape(spec['model']['arch'])}"
                f" · {html.escape(spec['threat']['norm'])} ε = {spec['threat']['epsilon']:.4g}"
                f" · report_version {report['report_version']}</p>"]
    rows = []
    for model, res in (report.get("final_models") or {"last": report["final"]}).items():
        rows.append((model, "clean", res["clean_acc"], res["n"]))
        rows += [(model, name, a["acc"], a["n"]) for name, a in res["attacks"].items()]
    sections += ["<h2>Final evaluation</h2>", _table(rows, ("model", "attack", "acc", "n"))]
    if hist:
        sections += ["<h2>Training</h2>",
                     line_chart("train loss", epochs, {"loss": [h["train_loss"] for h in hist]}),
                     line_chart("accuracy per epoch (monitor slice)", epochs, {
                         "train (adversarial)": [h["train_acc"] for h in hist],
                         "clean": [m.get("clean_acc") for m in mon],
                         "FGSM": [m.get("fgsm_acc") for m in mon],
                         "PGD": [m.get("pgd_acc") for m in mon]},
                         y_max=1.0, markers=co_epochs)]
    if co_epochs:
        sections.append("<p class='co'>Catastrophic overfitting at epoch(s) "
                        + ", ".join(str(e) for e in co_epochs) + " (dashed red lines).</p>")
    if report.get("selection"):
        sel = report["selection"]
        sections.append(_table([(sel["epoch"], sel["monitor_pgd_acc"],
                                 sel["last_monitor_pgd_acc"], sel["robust_generalization_gap"])],
                               ("best epoch", "best monitor PGD", "last monitor PGD", "gap")))
    cert = report.get("certification")
    if cert:
        sections += ["<h2>Certified robustness (randomized smoothing)</h2>",
                     f"<p>σ = {cert['sigma']}, n0 = {cert['n0']}, n = {cert['n']}, "
                     f"α = {cert['alpha']}, {cert['num_points']} points; ACR {cert['acr']:.4f}, "
                     f"abstain rate {cert['abstain_rate']:.4f}</p>",
                     line_chart("certified accuracy vs radius", cert["radii"],
                                {"certified accuracy": cert["certified_accuracy"]},
                                y_max=1.0, x_label="ℓ2 radius")]
    sections += ["<h2>Timing (s)</h2>",
                 _table(list(report.get("timing", {}).items()), ("phase", "seconds")),
                 "<h2>Spec as run</h2>",
                 f"<pre>{html.escape(json.dumps(spec, indent=2))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             ".co{color:#d62728}pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{style}</style></head><body>"
            + "\n".join(s for s in sections if s) + "</body></html>")
