"""``report.html`` and ``report.json`` of the site's validation (``osteogate validate --out DIR``).

The HTML is self-contained: the figures are PNGs made with matplotlib (Agg, imported here only,
so the gateway starts without it) and embedded as base64, no script, no stylesheet from a
network, so a quality officer can open it offline or attach it to a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.gateway.groundtruth.stats import roc_curve
from osteogate.gateway.groundtruth.validation import FIGURES, NAMES, SiteValidation


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def figures_png(result: SiteValidation) -> dict[str, str]:
    """The report's plots as base64 PNGs: ROC curves, reliability, Bland-Altman."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a gateway host
    import matplotlib.pyplot as plt

    table = result.table
    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, truth, score in (("low BMD (T < -1.0)", table.low, table.p_low),
                               ("osteoporosis (T <= -2.5)", table.osteoporosis, table.p_osteoporosis)):
        keep = ~np.isnan(score)
        if keep.any() and 0 < truth[keep].sum() < keep.sum():
            fpr, tpr = roc_curve(truth[keep], score[keep])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC against DXA", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if result.reliability:
        predicted = [b["predicted"] for b in result.reliability]
        observed = [b["observed"] for b in result.reliability]
        sizes = [20 + 4 * b["n"] for b in result.reliability]
        ax.scatter(predicted, observed, s=sizes, alpha=0.7)
        ax.plot(predicted, observed)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="predicted P(T < -1.0)", ylabel="observed share with low BMD at DXA",
           title="Reliability (marker size: pairs)", xlim=(0, 1), ylim=(0, 1))
    out["reliability"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    keep = ~np.isnan(table.t_estimate)
    if keep.sum() >= 3 and result.bland_altman:
        mean = (table.t_estimate[keep] + table.t_dxa[keep]) / 2
        diff = table.t_estimate[keep] - table.t_dxa[keep]
        ax.scatter(mean, diff, s=12, alpha=0.6)
        ba = result.bland_altman
        for y, style in ((ba["bias"], "-"), (ba["loa_low"], "--"), (ba["loa_high"], "--")):
            ax.axhline(y, ls=style, color="firebrick")
    ax.set(xlabel="mean of estimate and DXA T-score", ylabel="estimate - DXA T-score",
           title="Bland-Altman: estimated vs DXA T-score")
    out["bland_altman"] = _png(fig)
    plt.close(fig)
    return out


_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}"
          "th{background:#eee}.note{color:#666}img{max-width:100%}")


def _cell(figure: Any) -> str:
    return html.escape(figure.text())


def render_html(result: SiteValidation, pngs: dict[str, str]) -> str:
    """The report page (escaped text, embedded images)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>OsteoGate site validation</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>OsteoGate: site validation against DXA</h1>",
             f"<p>{result.pairs} DXA-matched studies with a result, {result.patients} patients "
             f"({result.pairs_without_figures} more matched studies were not assessed). Made "
             f"{datetime.now(UTC).replace(microsecond=0).isoformat()}; model card "
             f"{html.escape(result.card_name or '-')}; {html.escape(_filters_text(result.filters))}.</p>",
             "<p class='note'>Truth: the DXA exam's lowest T-score (low bone density T &lt; -1.0, osteoporosis "
             "T &le; -2.5). Intervals: 95 % bootstrap over patients "
             f"({result.n_boot} resamples, seed {result.seed}). Claimed: the model card's grouped "
             "cross-validation on its training population.</p>",
             "<h2>Site against the claims</h2><ul>"]
    parts += [f"<li>{html.escape(result.verdicts[k])}</li>" for k in FIGURES]
    parts.append("</ul><h2>Figures</h2>")
    for key, caption in (("roc", "ROC curves"), ("reliability", "Reliability of P(low bone density)"),
                         ("bland_altman", "Bland-Altman")):
        parts.append(f"<figure><img alt='{caption}' src='data:image/png;base64,{pngs[key]}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    if result.bland_altman:
        ba = result.bland_altman
        parts.append(f"<p>Bland-Altman: bias {ba['bias']:+.2f}, 95 % limits of agreement "
                     f"{ba['loa_low']:+.2f} to {ba['loa_high']:+.2f} (n {ba['n']}).</p>")
    parts.append("<h2>By subgroup</h2><table><tr><th>subgroup</th><th>pairs</th>"
                 + "".join(f"<th>{html.escape(NAMES[k])}</th>" for k in FIGURES) + "</tr>")
    for dim, levels in result.subgroups.items():
        for level, figs in levels.items():
            n = max(f.n for f in figs.values())
            parts.append(f"<tr><td>{html.escape(dim)}: {html.escape(level)}</td><td>{n}</td>"
                         + "".join(f"<td>{_cell(figs[k])}</td>" for k in FIGURES) + "</tr>")
    parts.append("</table><p class='note'>Subgroups are small: read their intervals, not their values. "
                 "A site figure below the claimed interval means the shipped figures do not hold here.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: SiteValidation, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (created); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(result, figures_png(result)), encoding="utf-8")
    return html_path, json_path


def _filters_text(filters: dict[str, str]) -> str:
    """"all pairs" or "since 2026-01-01, region knee": what narrowed the report, in words."""
    shown = [f"{key} {value}" for key, value in filters.items() if value not in (None, "", [])]
    return "all pairs" if not shown else "only " + ", ".join(shown)
