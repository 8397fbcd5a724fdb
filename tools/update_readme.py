"""Write the demo's results into README.md (between the results markers) from a run's metrics.json,
and draw the README's pictures (docs/glyphs.png, docs/confusion_blocks.png) from the same run.

    python tools/update_readme.py [runs/demo]

The numbers are the kit's own output: nothing in the table is typed by hand.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def results_markdown(metrics: dict, run_dir: Path) -> str:
    rows = ["| model / rule | test top-1 | relative change | conditional acc. (Table 3) |", "| --- | ---: | ---: | ---: |"]
    for r in metrics["comparison"]:
        rel = "—" if r["name"] == "generalist" else f"{r['relative_change'] * 100:+.1f}%"
        cond = "" if r.get("conditional_acc") is None else f"{r['conditional_acc'] * 100:.2f}%"
        rows.append(f"| {r['name']} | {r['top1'] * 100:.2f}% | {rel} | {cond} |")
    t4 = ["| specialists covering the true class | test examples | Δ correct (kl) | relative gain | paper (JFT) |",
          "| ---: | ---: | ---: | ---: | ---: |"]
    paper = {"0": "0.0%", "1": "+3.4%", "2": "+7.4%", "3": "+8.8%", "4": "+10.5%"}
    for r in metrics["table4"].get("kl", []):
        if r["covered_by"] == "total":
            continue
        gain = "" if r["relative_gain"] is None else f"{r['relative_gain'] * 100:+.1f}%"
        t4.append(f"| {r['covered_by']} | {r['n_examples']} | {r['delta_correct']:+d} | {gain} | {paper.get(r['covered_by'], '')} |")
    f = metrics["cost"]["flops"]
    t = metrics["timings"]
    cfg = metrics["config"]
    lines = [
        f"From `{run_dir}/metrics.json` (dataset `{metrics['dataset']['name']}`, {metrics['dataset']['num_classes']} classes, "
        f"{metrics['dataset']['train']} training / {metrics['dataset']['test']} test images; "
        f"generalist `{cfg['model']}` width {cfg['width']} depth {cfg['depth']}, "
        f"{cfg['epochs']} epochs; k = {cfg['k']} groups by `{cfg['method']}` with overlap `{cfg['overlap']}`; "
        f"specialists {cfg['specialist_epochs']} epochs).",
        "", *rows, "", *t4, "",
        f"Cost per image: {f['conditional_ratio']:.2f}× the generalist's FLOPs with conditional execution "
        f"({f['mean_active']:.2f} specialists per image), {f['all_ratio']:.2f}× running all; {f['params_ratio']:.1f}× the parameters.",
        "", "Wall time per stage on this machine (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + ".",
    ]
    return "\n".join(lines)


def glyph_grid(out: Path) -> None:
    from PIL import Image

    from specialkit import data

    ds = data.load("glyphs", per_class=2, val_fraction=0.5)
    x, _ = data.examples_per_class(ds, per_class=2)
    x = x[:, 0].numpy().reshape(62, 2, 32, 32)
    cols, gap = 31, 2
    grid = np.full((4 * (32 + gap), cols * (32 + gap)), 40, dtype=np.uint8)
    for c in range(62):
        for k in range(2):
            r = (c // cols) * 2 + k
            col = c % cols
            grid[r * 34 : r * 34 + 32, col * 34 : col * 34 + 32] = x[c, k]
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out)


def confusion_png(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specialkit import clusters, pipeline

    run = pipeline.Run.open(run_dir, log=lambda s: None)
    cs, spec = run.confusion(), run.clusters()
    order = clusters.order_classes(spec)
    F = cs.F[np.ix_(order, order)].copy()
    np.fill_diagonal(F, np.nan)
    fig, ax = plt.subplots(figsize=(8, 7.2), dpi=110)
    from matplotlib.colors import PowerNorm

    im = ax.imshow(F, cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=float(np.nanmax(F))))
    names = [cs.class_names[i] for i in order]
    ax.set_xticks(range(len(names)), names, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    start = 0
    placed = set()
    for idx in spec.indices():
        n = len([i for i in idx if i not in placed])
        placed |= set(idx.tolist())
        ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), n, n, fill=False, ec="white", lw=1.2))
        start += n
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation confusion of the generalist, reordered into {len(spec.groups)} groups "
                 "(diagonal hidden, square-root colour scale)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0]) if argv else Path("runs/demo")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"<!-- results:start -->\n{results_markdown(metrics, run_dir)}\n<!-- results:end -->"
    readme.write_text(re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, text, flags=re.S))
    (ROOT / "docs").mkdir(exist_ok=True)
    glyph_grid(ROOT / "docs" / "glyphs.png")
    confusion_png(run_dir, ROOT / "docs" / "confusion_blocks.png")
    print(f"README.md results and docs/*.png written from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
