"""Loss and accuracy curves of a run folder (RUN/curves.png) from its metrics.jsonl; matplotlib Agg."""
from pathlib import Path

from hcd.engine.errors import DataError
from hcd.engine.metrics import read_metrics

# Drawn when present: the total and the unweighted parts of docs/method.md, Losses (a KL term taking over
# shows here), with the legend's words for them.
LOSS_KEYS = {"loss": "loss (weighted total)", "ce": "ce: student CE", "kd": "kd: student KD",
             "sce": "sce: sub-logit CE (sum of stages)", "skl": "skl: sub-logit KL (sum of stages)",
             "ol": "ol: orthogonality (sum of stages)"}


def plot_run(run) -> int:
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run}: no metrics.jsonl (not a run folder)")
    rows = read_metrics(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    teacher = [r for r in rows if r.get("kind") == "teacher"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})

    for key, label in LOSS_KEYS.items():
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax_loss.plot(xs, ys, label=label, linewidth=2 if key == "loss" else 1)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (parts unweighted)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    if train:  # outside the axes: inside, it hid the first steps of the curves under it
        ax_loss.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)

    for key, style in (("val_top1", "o-"), ("val_top5", "s--")):
        pts = [(r["epoch"], r[key]) for r in evals if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax_acc.plot(xs, ys, style, label=f"student {key[4:]}")
    if teacher:
        ax_acc.axhline(teacher[-1]["teacher_top1"], color="gray", linestyle=":",
                       label=f"teacher top1 ({teacher[-1]['teacher_top1']:.1f}%)")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))  # a short run's axis would read 0.25, 0.5, ...
    ax_acc.set_ylabel("val accuracy (%)")
    ax_acc.set_ylim(0, 102)
    ax_acc.set_title("validation accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:  # an empty run has nothing to label
        ax_acc.legend(fontsize=8, loc="lower right")

    fig.suptitle(run.name)
    fig.tight_layout()
    tmp = run / ".curves.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(run / "curves.png")
    print(f"wrote {run / 'curves.png'}")
    return 0
