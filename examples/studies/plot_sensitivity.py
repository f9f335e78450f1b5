"""Plot of the worked example of docs/batch.md: protocol metrics versus couch-speed and leaf-latency errors.

Run after the study::

    tomodose batch examples/studies/liver_couch_latency.toml --out liver_couch_latency-results
    python examples/studies/plot_sensitivity.py liver_couch_latency-results docs/figures/batch/liver_couch_latency.png

Reads ``summary.csv`` and prints the table used in ``docs/batch.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# (column, label, hard limit of the protocol or None)
PANELS = [
    [("PGTV_coverage", "PGTV V50Gy (%)", 96.0), ("PTV_coverage", "PTV V30Gy (%)", 96.0)],
    [("PGTV D98%", "PGTV D98% (Gy)", None), ("PGTV D2%", "PGTV D2% (Gy)", None)],
    [("NormalLiver_mean", "normal liver mean (Gy)", 22.0), ("Kidneys_mean", "kidneys mean (Gy)", None)],
]
AXES = [("couch_speed_error_percent", "couch-speed error (%)"), ("leaf_latency_error_ms", "leaf-latency error (ms)")]


def one_at_a_time(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows where only ``column`` may be non-zero, sorted by it."""
    others = [c for c, _ in AXES if c != column] + ["jaw_width_error_mm", "gantry_period_error_percent",
                                                      "setup_shift_x_mm", "setup_shift_y_mm", "setup_shift_z_mm"]
    mask = (df[others] == 0).all(axis=1) & (df["status"].isin(["done", "cached"]))
    return df[mask].drop_duplicates("case_hash").sort_values(column)


def main(out_dir: str, png: str) -> None:
    df = pd.read_csv(Path(out_dir) / "summary.csv", keep_default_na=False, na_values=[""])
    fig, axes = plt.subplots(len(PANELS), len(AXES), figsize=(9.0, 8.5), sharex="col", constrained_layout=True)
    for j, (xcol, xlabel) in enumerate(AXES):
        sub = one_at_a_time(df, xcol)
        for i, panel in enumerate(PANELS):
            ax = axes[i, j]
            for k, (col, label, hard) in enumerate(panel):
                if col not in sub:
                    continue
                colour = f"C{k}"
                ax.plot(sub[xcol], sub[col], "o-", color=colour, label=label)
                if hard is not None:
                    ax.axhline(hard, color=colour, ls=":", lw=1)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8, loc="best")
            if i == len(PANELS) - 1:
                ax.set_xlabel(xlabel)
    fig.suptitle("Liver phantom, optimised helical plan (pencil beam, 8 mm grid): delivery errors, fixed MU\n"
                 "dotted: protocol hard limits", fontsize=10)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    cols = ["PGTV_coverage", "PGTV_underdose", "PTV_coverage", "PGTV D98%", "PGTV D2%", "NormalLiver_mean",
            "n_hard_failed", "verdict"]
    for xcol, _ in AXES:
        sub = one_at_a_time(df, xcol)
        print(sub[[xcol] + [c for c in cols if c in sub]].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"figure written to {png}")


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("liver_couch_latency-results",
                                                      "docs/figures/batch/liver_couch_latency.png")))
