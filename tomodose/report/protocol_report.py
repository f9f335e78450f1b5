"""Render a protocol evaluation: JSON for machines, Markdown / HTML and a DVH plot for people.

All files are written atomically (temporary file in the same folder, then ``os.replace``).
The DVH plot uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from tomodose import __version__
from tomodose._atomic import atomic_write_bytes, atomic_write_text
from tomodose.evaluation.protocol import (
    GOAL_MISSED, HARD_FAILED, INFO, NOT_EVALUATED, PASS, ProtocolEvaluation,
)

__all__ = ["to_dict", "to_json", "to_markdown", "to_html", "plot_dvh", "write_report", "text_table",
           "atomic_write_text", "atomic_write_bytes"]

_SYMBOL = {PASS: "PASS", GOAL_MISSED: "GOAL MISSED", HARD_FAILED: "FAIL", INFO: "info",
           NOT_EVALUATED: "not evaluated"}


def _clean(v):
    """JSON-safe values (nan/inf -> None)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return _clean(v.item())
    return v


def to_dict(ev: ProtocolEvaluation, *, dvh_step_gy: float = 0.1) -> dict:
    """Plain-dict form of the evaluation (what :func:`to_json` writes)."""
    p = ev.protocol
    return _clean({
        "tomodose_version": __version__,
        "protocol": {"id": p.id, "title": p.title, "version": p.version,
                     "schema_version": p.schema_version, "n_fractions": p.n_fractions,
                     "source": p.path, "references": list(p.references)},
        "options": ev.options,
        "dose": ev.dose_name,
        "scale_factor": ev.scale_factor,
        "bin_width_gy": ev.bin_width_gy,
        "overall": ev.overall,
        "counts": ev.counts(),
        "constraints": [r.to_dict() for r in ev.results],
        "targets": [{"name": t.name, "prescription_gy": t.prescription_gy, "source": t.source}
                    for t in p.targets],
        "structure_volumes_ml": ev.structure_volumes_ml,
        "missing_structures": list(ev.missing_structures),
        "target_nesting_outside_percent": ev.nesting_outside_percent,
        "plan_metrics": ev.plan_metrics,
        "radiobiology": ev.radiobiology,
        "dvhs": {k: d.to_dict(step_gy=dvh_step_gy) for k, d in ev.dvhs.items()},
    })


def to_json(ev: ProtocolEvaluation, **kw) -> str:
    return json.dumps(to_dict(ev, **kw), indent=2, allow_nan=False)


def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}"


def _limit_text(r) -> str:
    if r.operator is None:
        return "-"
    parts = []
    if r.goal is not None:
        parts.append(f"goal {r.operator} {r.goal:g}")
    if r.hard is not None:
        parts.append(f"hard {r.operator} {r.hard:g}")
    return ", ".join(parts)


def _rows(ev: ProtocolEvaluation) -> list[list[str]]:
    rows = []
    for r in ev.results:
        rows.append([
            r.id, r.structure, r.metric, f"{_fmt(r.value)} {r.unit}" if r.value is not None else "-",
            _limit_text(r), _fmt(r.margin_goal), _fmt(r.margin_hard),
            _SYMBOL[r.verdict] + (" (borderline)" if r.borderline else ""),
        ])
    return rows


_HEAD = ["constraint", "structure", "metric", "value", "limits", "margin to goal", "margin to hard", "verdict"]


def text_table(ev: ProtocolEvaluation) -> str:
    """Plain-text table of the constraints (what ``tomodose dvh`` prints)."""
    rows = [_HEAD] + _rows(ev)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    lines = [f"Protocol {ev.protocol.id} v{ev.protocol.version} on dose {ev.dose_name!r}"
             + (f" (scaled x{ev.scale_factor:.4f})" if ev.scale_factor != 1.0 else "")]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"overall: {ev.overall.upper()}  {ev.counts()}")
    rb = ev.radiobiology
    if rb.get("ntcp_rild_primary"):
        lines.append(
            f"RILD NTCP (LKB, Dawson 2002) on {rb['structure']}: primary {100 * rb['ntcp_rild_primary']['ntcp']:.1f} %, "
            f"metastases {100 * rb['ntcp_rild_metastases']['ntcp']:.1f} %; critical volume "
            f"{rb['critical_volume']['spared_volume_ml']:.0f} mL below {rb['critical_volume']['threshold_gy']:.1f} Gy "
            f"({'met' if rb['critical_volume']['passed'] else 'NOT met'}, >= {rb['critical_volume']['min_volume_ml']:g} mL)")
    return "\n".join(lines)


def to_markdown(ev: ProtocolEvaluation, *, plot_path: str | None = None) -> str:
    """Markdown report: constraints table, options, plan metrics, radiobiology, DVH plot link."""
    p = ev.protocol
    out = [f"# Protocol evaluation: {p.title}", "",
           f"- protocol `{p.id}` version {p.version} (schema {p.schema_version}), {p.n_fractions} fractions",
           f"- dose `{ev.dose_name}`" + (f", scaled by {ev.scale_factor:.5f} (coverage normalisation)"
                                          if ev.scale_factor != 1.0 else ""),
           f"- overall verdict: **{ev.overall}** ({', '.join(f'{k}: {v}' for k, v in ev.counts().items())})",
           f"- DVH bin width {ev.bin_width_gy:g} Gy (borderline = verdict changes within one bin)",
           f"- tomodose {__version__}", "", "## Constraints", "",
           "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    for row in _rows(ev):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    out += ["", "Sources:", ""]
    for r in ev.results:
        out.append(f"- `{r.id}`: {r.source}" + (f" ({r.note})" if r.note else ""))
    out += ["", "## Options", ""]
    for k, v in ev.options.items():
        out.append(f"- `{k}` = `{v}`: {p.options[k]['doc']}".replace("\n", " "))
    if ev.missing_structures:
        out += ["", f"Structures not present (constraints not evaluated): {', '.join(ev.missing_structures)}"]
    out += ["", "## Plan metrics", "", "| target | Rx (Gy) | D98% | D95% | D50% | D2% | HI | Paddick CI | GI | R50% |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t, m in ev.plan_metrics.items():
        out.append(f"| {t} | {m['prescription_gy']:g} | {_fmt(m['D98%'])} | {_fmt(m['D95%'])} | {_fmt(m['D50%'])} | "
                   f"{_fmt(m['D2%'])} | {_fmt(m['HI'], 3)} | {_fmt(m['Paddick_CI'], 3)} | {_fmt(m['GI'], 2)} | "
                   f"{_fmt(m['R50%'], 2)} |")
    out += ["", "## Structures", "", "| structure | volume (mL) | Dmin | Dmean | Dmax |", "|---|---|---|---|---|"]
    for k, d in ev.dvhs.items():
        out.append(f"| {k} | {d.total_volume_ml:.1f} | {d.min_gy:.2f} | {d.mean_gy:.2f} | {d.max_gy:.2f} |")
    rb = ev.radiobiology
    if rb.get("ntcp_rild_primary"):
        pr, me, cv = rb["ntcp_rild_primary"], rb["ntcp_rild_metastases"], rb["critical_volume"]
        out += ["", "## Radiobiology (informational)", "",
                f"- structure `{rb['structure']}`, alpha/beta {rb['alpha_beta_gy']:g} Gy, {rb['n_fractions']} fractions",
                f"- mean EQD2 {rb['mean_eqd2_gy']:.2f} Gy",
                f"- LKB NTCP for RILD (Dawson 2002, EQD at 1.5 Gy/fx): primary {100 * pr['ntcp']:.2f} % "
                f"(gEUD {pr['geud_gy']:.2f} Gy, TD50 {pr['td50_gy']:g} Gy); metastases {100 * me['ntcp']:.2f} % "
                f"(TD50 {me['td50_gy']:g} Gy)",
                f"- critical volume: {cv['spared_volume_ml']:.0f} mL below {cv['threshold_gy']:.2f} Gy "
                f"({'met' if cv['passed'] else 'NOT met'}; {cv['source']})"]
        for t, v in rb.get("targets", {}).items():
            out.append(f"- {t}: prescription BED {v['prescription_bed_gy']:.1f} Gy / EQD2 "
                       f"{v['prescription_eqd2_gy']:.1f} Gy (alpha/beta {v['alpha_beta_gy']:g} Gy); "
                       f"mean EQD2 {v['mean_eqd2_gy']:.1f} Gy")
    if plot_path:
        out += ["", "## DVH", "", f"![DVH]({plot_path})"]
    return "\n".join(out) + "\n"


def to_html(ev: ProtocolEvaluation, *, plot_path: str | None = None) -> str:
    """Self-contained HTML page with the same content as the Markdown report's table."""
    colours = {PASS: "#d8f5d0", GOAL_MISSED: "#fff2c0", HARD_FAILED: "#f8c8c8", INFO: "#eeeeee",
               NOT_EVALUATED: "#e0e0e0"}
    rows = []
    for r, cells in zip(ev.results, _rows(ev)):
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        rows.append(f'<tr style="background:{colours[r.verdict]}" title="{html.escape(r.source)}">{tds}</tr>')
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEAD)
    img = f'<p><img src="{html.escape(plot_path)}" alt="DVH" width="800"></p>' if plot_path else ""
    md = html.escape(to_markdown(ev))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(ev.protocol.title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:3px 6px}</style></head><body>"
            f"<h1>{html.escape(ev.protocol.title)}</h1><p>Overall: <b>{html.escape(ev.overall)}</b></p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>{img}<h2>Full report</h2><pre>{md}</pre></body></html>")


def plot_dvh(ev: ProtocolEvaluation, path, *, structures=None, dpi: int = 120) -> Path:
    """Cumulative DVHs (dose in Gy vs volume in %) as a PNG; prescriptions as dashed lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import io

    names = list(structures) if structures is not None else list(ev.dvhs)
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    colours = matplotlib.colormaps["tab20"].colors
    targets = {t.name for t in ev.protocol.targets}
    for i, n in enumerate(names):
        d = ev.dvhs[n]
        ax.plot(d.edges_gy, d.cumulative_percent, label=n, color=colours[i % 20],
                lw=2.2 if n in targets else 1.3, ls="-" if i < 20 else "--")
    for t in ev.protocol.targets:
        ax.axvline(t.prescription_gy, ls="--", lw=0.8, color="k")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{ev.protocol.id}: {ev.dose_name}")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(ev: ProtocolEvaluation, *, json_path=None, markdown_path=None, html_path=None,
                 plot_path=None) -> dict:
    """Write any of the report files; returns ``{kind: Path}``. The plot is linked by relative name."""
    out = {}
    rel = None
    if plot_path:
        out["plot"] = plot_dvh(ev, plot_path)
        rel = Path(plot_path).name
    if json_path:
        out["json"] = atomic_write_text(json_path, to_json(ev))
    if markdown_path:
        out["markdown"] = atomic_write_text(markdown_path, to_markdown(ev, plot_path=rel))
    if html_path:
        out["html"] = atomic_write_text(html_path, to_html(ev, plot_path=rel))
    return out
