"""Write the teaching notebooks in ``notebooks/`` (clean, without outputs) from the cell lists below.

Run ``python tools/build_notebooks.py`` after editing; ``tests/test_notebooks_clean.py`` checks that
the committed notebooks equal what this script writes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """\
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from specialkit import clusters, data, evaluation, pipeline, plots, report
from specialkit.config import PipelineConfig"""

PARAMETERS = """\
# Parameters: the one cell to change. SPECIALKIT_SMOKE=1 (set by the tests) picks quick settings;
# otherwise these are the `make demo` settings, so the notebooks share the demo's run folder.
# Scale up here, e.g. dataset="cifar100", root="~/data", image_size=32, model="resnet18",
# epochs=30, k=10, specialist_epochs=10, device="cuda".
config = PipelineConfig.from_env(dataset="glyphs", model="cnn", device="auto", seed=0)
run = pipeline.Run(pipeline.runs_root("../runs") / config.name, config)
ds = run.dataset()"""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str, *, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def preamble(title: str, intro: str) -> list[nbformat.NotebookNode]:
    return [md(f"# {title}\n\n{intro}"), code(IMPORTS), md("## Parameters"), code(PARAMETERS, tags=("parameters",))]


NB01 = preamble(
    "01 · The generalist",
    """A **generalist** is one classifier trained on all C classes (Hinton, Vinyals & Dean 2015, §5).
Its mistakes on held-out data — the *validation* split, never the test split — are what the
next notebooks turn into groups of classes for specialists. Here we look at the data, train the
generalist (or load it: every stage of a run is saved in `runs/<name>/` and re-used), and check it.""",
) + [
    md("""## The data
The built-in `glyphs` dataset renders 62 characters from the fonts inside matplotlib. Look for the
look-alikes: `o O 0`, `l I 1 i`, `s S 5`, `z Z 2`, `c C`, `v V u U` ..."""),
    code("""print(ds.summary())
x, y = data.examples_per_class(ds, per_class=2)
plots.sample_grid(x, y.numpy(), ds.class_names, ncols=31, title="two training images per class")"""),
    md("""## Train the generalist
One training loop serves every model of the kit: SGD with Nesterov momentum, a one-cycle schedule,
random-crop augmentation (no flips for characters), a progress bar, a checkpoint every epoch (an
interrupted run resumes) and early stopping when asked."""),
    code("""gen = run.generalist()
plots.training_curves({"generalist": gen.history})"""),
    md("""## How good is it?
Test accuracy is reported once, at the end; the validation split is what later stages study."""),
    code("""y_test = ds.y_test.numpy()
test_acc = evaluation.top1(gen.test_probs, y_test)
per_class = evaluation.per_class_change(gen.test_probs, gen.test_probs, y_test, class_names=ds.class_names)
print(f"test top-1: {test_acc:.1%}   (chance: {1 / ds.num_classes:.1%})")
per_class.sort_values("gen_acc").head(10)[["name", "n", "gen_acc"]]"""),
    md("The ten hardest classes above are mostly members of look-alike groups: that is the structure specialists exploit."),
    code("""# Checks: the notebook fails if it computed nonsense.
assert gen.test_probs.shape == (len(y_test), ds.num_classes)
assert np.allclose(gen.test_probs.sum(axis=1), 1.0, atol=1e-5)
assert np.isfinite(test_acc) and 2.0 / ds.num_classes < test_acc <= 1.0, test_acc
assert len(gen.history) >= 1 and all(np.isfinite(r["train_loss"]) for r in gen.history)
assert (run.folder / "generalist" / "model.pt").is_file()"""),
]

NB02 = preamble(
    "02 · The confusion structure",
    """Which classes does the generalist mix up? Two statistics answer it, both from the **validation**
split: the **confusion matrix** (needs labels) and the paper's choice, the **covariance of the
predicted probabilities** (needs no labels: classes that are often predicted *together* go together,
§5.3). Reordered so that groups sit together, both become nearly block-diagonal — the blocks are the
specialists' jobs.""",
) + [
    code("""gen = run.generalist()
cs = run.confusion()
print(f"validation accuracy {cs.accuracy:.1%} over {cs.num_classes} classes")
plots.confusion_heatmap(cs.F, cs.class_names, hide_diagonal=True, title="row-normalised confusion (diagonal hidden)")"""),
    md("""### The most confused pairs"""),
    code("""cs.top_pairs(10)"""),
    md("""### Covariance of the predicted probabilities
Entry (i, j) is the covariance over validation images of p(i) and p(j). Positive off-diagonal
entries mean the generalist hedges between i and j."""),
    code("""plots.covariance_heatmap(cs.covariance, cs.class_names)"""),
    md("""### The block view
Cluster the classes (the configured method: `balanced` groups of nearly equal size by default; the
paper's online k-means on covariance columns is `method="covariance_kmeans"`; notebook 03 compares
them) and reorder rows and columns by group: confusions concentrate inside the outlined blocks."""),
    code("""spec = run.compute_clusters()
order = clusters.order_classes(spec)
plots.confusion_heatmap(cs.F, cs.class_names, order=order, groups=spec.indices(), hide_diagonal=True,
                        title=f"confusion reordered into {len(spec.groups)} groups ({config.method})")"""),
    md("""### A map of the classes
UMAP places each class in 2-D from HD-CNN's class distance (1 − how often two classes are mistaken
for each other, from the predicted probabilities): look-alikes land close together.
Hover a point for its class."""),
    code("""coords = run.class_map()
plots.class_map(coords, cs.class_names, group_labels=clusters.group_labels(spec), group_names=list(spec.groups))"""),
    md("""### A dendrogram of class distances
HD-CNN's distance D = ½[(I−F)+(I−F)ᵀ]: hierarchical clustering shows at which level groups merge."""),
    code("""plots.dendrogram(cs.distance, cs.class_names)"""),
    md("""### What the confusions look like
Validation images of the most confused pairs, with what the generalist said."""),
    code("""idx = pipeline.confused_examples(run, pairs=6, per_pair=4)
x_val, y_val = ds.split("val")
pred = gen.val_probs.argmax(axis=1)
plots.confused_examples_grid(x_val[idx], y_val.numpy()[idx], pred[idx], ds.class_names, ncols=8)"""),
    code("""# Checks
C = ds.num_classes
assert cs.cm.shape == (C, C) and cs.cm.sum() == len(ds.y_val)
assert np.allclose(cs.covariance, cs.covariance.T) and np.all(np.isfinite(cs.covariance))
assert sorted(order.tolist()) == list(range(C))
assert coords.shape == (C, 2) and np.all(np.isfinite(coords))
within = clusters.quality(spec, cs.cm)
print(within)
assert 0.0 <= within["in_group_error_share"] <= 1.0
assert len(idx) > 0 and all(pred[i] != y_val[i].item() for i in idx)"""),
]

NB03 = preamble(
    "03 · Choosing clusters",
    """Each group of classes becomes one specialist. A good grouping keeps the generalist's mistakes
**inside** groups, so some specialist sees each confusion that matters. Here we compare the methods
side by side, then pick (and edit) a spec interactively and save it as `clusters.json`.

*Why covariance and confusion agree.* When the generalist hedges between i and j, p(i) and p(j)
rise together on the same images (covariance > 0), and its argmax flips between them (confusion).
The covariance needs no labels and uses the whole distribution, so it is less noisy with few images.

*What overlap buys.* A class confused with two groups can belong to both (HD-CNN's rule); then two
specialists vote on it — the paper's Table 4 found gains grow with the number of specialists covering a class.

*Read the share with the sizes.* One giant group keeps most errors "inside a group" but leaves its
specialist as hard a job as the generalist's. With an accurate generalist the paper's covariance
k-means tends to do exactly that (compare `size_max`); `balanced` caps the sizes.""",
) + [
    code("""gen = run.generalist()
cs = run.confusion()
specs = pipeline.method_specs(run)
table = clusters.quality_table(specs, cs.cm, coarse_of_class=ds.coarse_of_class)
table"""),
    code("""plots.quality_bars(table, metric="in_group_error_share")"""),
    md("""## The picker
Choose the method, k, overlap and size cap; move a class to another group, add it to a second group
or remove it (select it in the list or click / lasso it on the map); undo; save. The heatmap, the
map and the quality numbers follow every change. With no one clicking, the notebook keeps the
configured method's spec."""),
    code("""from specialkit.widgets import ClusterPicker

picker = ClusterPicker.from_run(run)
picker"""),
    code("""spec = picker.spec
run.save_clusters(spec)
print(f"saved {len(spec.groups)} groups to {run.folder / 'clusters.json'}")
{name: " ".join(members) for name, members in spec.groups.items()}"""),
    code("""# Checks
from specialkit.clusters import ClusterSpec
saved = ClusterSpec.load(run.folder / "clusters.json")
assert saved == spec and len(saved.groups) >= 2
assert set(table.index) == set(specs)
assert table["in_group_error_share"].between(0, 1).all()
assert all(len(m) >= 1 for m in saved.groups.values())"""),
]

NB04 = preamble(
    "04 · Training the specialists",
    """A **specialist** sees its group's classes plus one **dustbin** class for everything else
(§5.2). Following the paper: it starts from the generalist's weights (the head keeps the group's
rows and gains a dustbin row), trains on batches that are half its own classes and half the rest,
and afterwards adds log(oversampling factor) to the dustbin logit to undo the enriched sampling.
Specialists are independent: `specialkit train-specialist --run runs/<name> --index i` trains one,
so a scheduler can train them in parallel.""",
) + [
    code("""spec = run.clusters()
print(f"{len(spec.groups)} groups from {run.folder / 'clusters.json'}")
sps = run.specialists()
summary = pipeline.specialist_summary(run)
summary"""),
    md("""### Training curves
Validation accuracy here is on the specialist's own targets (its classes + dustbin)."""),
    code("""plots.training_curves({group: sp.history for group, sp in zip(summary.index, sps)})"""),
    md("""### What the dustbin correction does
Trained on half special examples, a specialist over-predicts its own classes. The correction shifts
the dustbin logit by log r; the share of validation images it sends to the dustbin moves toward the
true share of non-special images."""),
    code("""effect = pipeline.dustbin_effect(run)
effect"""),
    code("""# Checks
assert len(sps) == len(spec.groups)
for sp, (name, members) in zip(sps, spec.groups.items()):
    assert len(sp.classes) == len(members) and np.isfinite(sp.dustbin_correction)
assert summary["test_acc_own_classes"].between(0, 1).all()
err_before = (effect["dustbin_share_uncorrected"] - effect["true_dustbin_share"]).abs().mean()
err_after = (effect["dustbin_share_corrected"] - effect["true_dustbin_share"]).abs().mean()
print(f"mean |dustbin share - true share|: {err_before:.3f} before, {err_after:.3f} after the correction")
assert np.isfinite(err_after)"""),
]

NB05 = preamble(
    "05 · Comparing ensembles",
    """Do the specialists pay off? At inference the generalist's top-n guesses switch on every
specialist whose group contains one of them, and their opinions are combined. We compare:

* `generalist` alone, and a **compute-matched generalist** trained further for as many example-passes
  as all specialists used (an honest baseline, METHOD.md §6);
* `kl` — the paper's rule: the distribution q minimising KL(p_g‖q) + Σ KL(p_m‖q), solved exactly;
* `top_confident` — run the most confident specialists and average;
* `moe` — the generalist's probabilities weight the specialists (a mixture of experts).""",
) + [
    code("""metrics = run.metrics()
comparison = pd.DataFrame(metrics["comparison"]).set_index("name")
comparison"""),
    code("""plots.accuracy_bars(comparison["top1"].to_dict(), baseline="generalist", title="test top-1")"""),
    md("""### Gain by the number of specialists covering the true class (the paper's Table 4)"""),
    code("""table4 = pd.DataFrame(metrics["table4"]["kl"])
table4_plot = table4[table4["covered_by"] != "total"].rename(columns={"covered_by": "coverage"})
display(table4)
plots.table4_chart(table4_plot)"""),
    md("""### Cost
FLOPs per image (the ensemble always runs the generalist first) and measured latency per image, with
and without conditional execution (a specialist runs only on the images that activate it)."""),
    code("""flops = metrics["cost"]["flops"]
latency = pd.DataFrame(metrics["cost"]["latency"])
display(pd.Series(flops).to_frame("value"))
latency"""),
    code("""points = report.cost_points(metrics)
plots.accuracy_vs_cost(points, cost_label="MFLOPs per image")"""),
    md("""### Per class: where did the ensemble help or hurt?"""),
    code("""y_test = ds.y_test.numpy()
gen = run.generalist()
q = run.ensembles()["kl"]
change = evaluation.per_class_change(gen.test_probs, q, y_test, class_names=ds.class_names)
plots.per_class_change(change["delta"].to_numpy(), ds.class_names, order=clusters.order_classes(run.clusters()))"""),
    code("""fixed, broken = evaluation.fixed_and_broken(gen.test_probs, q, y_test)
print(f"fixed {len(fixed)}, broke {len(broken)} of {len(y_test)} test images")
plots.fixed_broken_grid(ds.x_test, y_test, gen.test_probs.argmax(1), q.argmax(1), ds.class_names)"""),
    md("""### Reading"""),
    code("""display(Markdown(report.reading(metrics)))"""),
    code("""# Checks
assert {"generalist", "kl", "top_confident", "moe"} <= set(comparison.index)
assert comparison["top1"].between(0, 1).all()
rows = table4[table4["covered_by"] != "total"]
total = table4[table4["covered_by"] == "total"].iloc[0]
assert rows["n_examples"].sum() == len(y_test) == total["n_examples"]
assert rows["delta_correct"].sum() == total["delta_correct"]
assert flops["conditional_flops"] <= flops["all_flops"]
assert len(fixed) - len(broken) == round((comparison.loc["kl", "top1"] - comparison.loc["generalist", "top1"]) * len(y_test))"""),
]

NB06 = preamble(
    "06 · Distilling the ensemble into one model",
    """The paper's main subject is **distillation**: train one model on the soft targets of another.
For specialists it was left as future work (§5.4). Here a single student, of the generalist's size,
learns from the `kl` ensemble's distribution q softened at temperature T, plus the hard labels
(the soft term scaled by T²). If it keeps most of the ensemble's gain, the specialists' knowledge
fits in one model at the generalist's cost.""",
) + [
    code("""student = run.distill()
gen = run.generalist()
y_test = ds.y_test.numpy()
q = run.ensembles()["kl"]
rows = {"generalist": gen.test_probs, "kl ensemble": q, "student": student.test_probs}
table = evaluation.comparison_table(rows, y_test)
table"""),
    code("""plots.training_curves({"generalist": gen.history, "student": student.history})"""),
    code("""shape = (ds.channels, ds.image_size, ds.image_size)
cost = pd.DataFrame({
    "generalist": evaluation.model_cost(gen.model, shape),
    "student": evaluation.model_cost(student.model, shape),
}).T
cost"""),
    md("""Change `student_width` / `student_depth` in the parameters cell to distil into a smaller model,
or `distill_temperature` / `distill_soft_weight` to see how much the soft targets matter."""),
    code("""# Checks
assert student.test_probs.shape == gen.test_probs.shape
assert table["top1"].between(0, 1).all() and np.isfinite(table["top1"]).all()
assert (run.folder / "distill" / "model.pt").is_file()
assert table.loc["student", "top1"] > 2.0 / ds.num_classes"""),
]

NOTEBOOKS = {
    "01_generalist.ipynb": NB01,
    "02_confusion_structure.ipynb": NB02,
    "03_choose_clusters.ipynb": NB03,
    "04_train_specialists.ipynb": NB04,
    "05_compare_ensembles.ipynb": NB05,
    "06_distill_ensemble.ipynb": NB06,
}


def build(name: str) -> str:
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nbformat.writes(nb) + "\n"


def main() -> int:
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for name in NOTEBOOKS:
        (out / name).write_text(build(name))
        print(f"wrote notebooks/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
