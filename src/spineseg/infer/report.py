"""``report.html``: one self-contained page per prediction run (images embedded, no scripts, no network).

Per case: an overlay montage (post-processed outlines solid in the structure colours, the raw network
output dashed red, so what post-processing removed stays visible), the canal area and AP diameter
along the slices with the stenosis thresholds drawn, and the measurements table. At the top: the model,
engine and preprocessing that produced it.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from pathlib import Path

import numpy as np

from .. import LABELS
from ..io.atomic import atomic_write_text
from ..io.intensity import percentile_window
from ..io.preview import LABEL_COLORS
from .measure import MEASUREMENT_COLUMNS, StenosisThresholds, file_slice_index, narrowest

RAW_COLOR = (0.95, 0.10, 0.10)
STRUCTURE_NAMES = {v: k.replace("_", " ") for k, v in LABELS.items() if v}
MONTAGE_SLICES = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _outlines(ax, labels: np.ndarray, style: str, color=None, width: float = 1.0) -> None:
    for k, structure_color in LABEL_COLORS.items():
        mask = labels == k
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color or structure_color], linewidths=width,
                       linestyles=style)


def montage_png(image, raw: np.ndarray, post: np.ndarray, slice_numbers, max_slices: int = MONTAGE_SLICES) -> bytes:
    """Slices of ``image`` with raw (dashed red) and post-processed (solid, structure colours) outlines."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    n = image.num_slices
    picks = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
    ncols = min(4, len(picks))
    nrows = int(np.ceil(len(picks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.0 * ncols, 7.0), 3.4 * nrows + 0.6), squeeze=False)
    aspect = image.spacing[0] / image.spacing[1]  # rows and columns in millimetres
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), picks):
        ax.imshow(percentile_window(image.data[s]), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        _outlines(ax, raw[s], "dashed", RAW_COLOR, 1.4)
        _outlines(ax, post[s], "solid", None, 1.0)
        ax.set_title(f"slice {slice_numbers[s]}", fontsize=8)
    handles = [Line2D([], [], color=c, lw=1.5, label=STRUCTURE_NAMES[k]) for k, c in LABEL_COLORS.items()]
    handles.append(Line2D([], [], color=RAW_COLOR, lw=1.5, ls="--", label="raw network output"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (3.4 * nrows + 0.6), 1, 1))
    return _png(fig)


def canal_plot_png(rows: list[dict], thresholds: StenosisThresholds) -> bytes:
    """Canal area and AP diameter along the slices, with the relative / absolute stenosis thresholds."""
    plt = _pyplot()
    measured = [r for r in rows if r["canal_area_mm2"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    x = [r["position_mm"] for r in measured]
    for ax, key, label, (relative, absolute) in (
            (axes[0], "canal_area_mm2", "canal area (mm²)", (thresholds.relative_area_mm2, thresholds.absolute_area_mm2)),
            (axes[1], "canal_ap_mm", "canal AP diameter (mm)", (thresholds.relative_ap_mm, thresholds.absolute_ap_mm))):
        ax.plot(x, [r[key] for r in measured], "o-", color="0.2", ms=4)
        ax.axhline(relative, color="orange", ls="--", lw=1, label=f"relative < {relative:g}")
        ax.axhline(absolute, color="red", ls="--", lw=1, label=f"absolute < {absolute:g}")
        ax.set_xlabel("slice position along the normal (mm)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.15 * max([relative] + [r[key] for r in measured]))
        if len(measured) == 1:
            ax.set_xticks(x)
        ax.legend(fontsize=7, loc="best")
        if not measured:
            ax.text(0.5, 0.5, "no canal found", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return _png(fig)


def case_section(name: str, image, raw: np.ndarray, post: np.ndarray, rows: list[dict],
                 thresholds: StenosisThresholds) -> dict:
    """The rendered parts of one case (images as PNG bytes), so no image stays in memory afterwards."""
    by_display = sorted(rows, key=lambda r: r["position_mm"])
    slice_numbers = file_slice_index(image)  # titles use the written label map's slice numbers, as the table
    return {"name": name, "source": image.source, "shape": list(image.data.shape), "spacing": list(image.spacing),
            "montage": montage_png(image, raw, post, slice_numbers), "plot": canal_plot_png(by_display, thresholds),
            "rows": rows, "summary": narrowest(rows) if len(rows) > 1 else None}


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-top: 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
tr.absolute td { background: #fdd; } tr.relative td { background: #ffe9c6; }
.note { color: #555; font-size: 0.9em; } pre { background: #f6f6f6; padding: 0.5em; font-size: 0.8em; }
img { max-width: 100%; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _cell(value) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        return f"<td>{value:.1f}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>' if isinstance(value, str) else f"<td>{value}</td>"


def _table(rows: list[dict], columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f'<tr class="{html.escape(str(r.get("stenosis") or ""))}">' + "".join(_cell(r.get(c)) for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _settings_table(run: dict) -> str:
    rows = "".join(f'<tr><th>{html.escape(k)}</th><td class="text">{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}'
                   "</td></tr>" for k, v in run.items())
    return f"<table>{rows}</table>"


def report_html(sections: list[dict], run: dict, thresholds: StenosisThresholds, errors: list[str] = ()) -> str:
    t = thresholds
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>spineseg report</title><style>{_CSS}</style>"
             "</head><body>",
             "<h1>spineseg prediction report</h1>",
             f"<p class='note'>{len(sections)} case{'' if len(sections) == 1 else 's'}, written {html.escape(datetime.datetime.now().isoformat(timespec='seconds'))}."
             " Stenosis flags are for research only, not for diagnosis: <b>absolute</b> where the canal area is below "
             f"{t.absolute_area_mm2:g} mm² or its AP diameter below {t.absolute_ap_mm:g} mm, <b>relative</b> below "
             f"{t.relative_area_mm2:g} mm² or {t.relative_ap_mm:g} mm (area: Bolender et al. 1985, Hamanishi et al. "
             "1994, measured on the dural sac; AP: Verbiest). The canal here is the whole vertebral foramen.</p>",
             "<h2>Model and preprocessing</h2>", _settings_table(run)]
    if errors:
        parts.append("<h2>Inputs that failed</h2><ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in errors) + "</ul>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['name'])}</h2>")
        parts.append(f"<p class='note'>{html.escape(sec['source'])}: {sec['shape'][0]} slice(s) of "
                     f"{sec['shape'][1]} x {sec['shape'][2]} pixels at {sec['spacing'][0]:.3g} x "
                     f"{sec['spacing'][1]:.3g} mm</p>")
        if sec["summary"] and sec["summary"].get("narrowest_slice") is not None:
            s = sec["summary"]
            parts.append(f"<p>Narrowest canal: slice {s['narrowest_slice']} at {s['position_mm']:.1f} mm, "
                         f"{s['canal_area_mm2']:.0f} mm², AP {s['canal_ap_mm']:.1f} mm, transverse "
                         f"{s['canal_transverse_mm']:.1f} mm ({html.escape(s['stenosis'])}); "
                         f"slices flagged: {s['slices_relative']} relative, {s['slices_absolute']} absolute.</p>")
        parts.append(_img(sec["montage"], f"{sec['name']} overlays"))
        parts.append(_img(sec["plot"], f"{sec['name']} canal along the slices"))
        parts.append(_table(sec["rows"], MEASUREMENT_COLUMNS[2:]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, sections: list[dict], run: dict, thresholds: StenosisThresholds,
                 errors: list[str] = ()) -> Path:
    run = dict(run, stenosis_thresholds=thresholds.to_dict())
    atomic_write_text(path, report_html(sections, run, thresholds, errors))
    return Path(path)
