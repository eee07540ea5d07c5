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
    plt = _pyplot()
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

    for key, style, label in (("val_top1", "o-", "student top1"), ("val_top5", "s--", "student top5"),
                              ("val_top1_ema", "^-", "student EMA top1"), ("val_top5_ema", "v--", "student EMA top5")):
        pts = [(r["epoch"], r[key]) for r in evals if key in r]  # the EMA's: runs with train.ema_decay
        if pts:
            xs, ys = zip(*pts)
            ax_acc.plot(xs, ys, style, label=label)
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
    _save(fig, run / "curves.png")
    print(f"wrote {run / 'curves.png'}")
    return 0


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """Atomically: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)


def plot_compare(result: dict, path) -> None:
    """`hcd compare`'s figure: val top-1 per epoch of each method, the mean over its seeds as a line and
    the seeds' min-max as a band (epochs every seed evaluated), the teacher's top-1 dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, runs in result["runs"].items():
        curves = [dict(map(tuple, r["curve"])) for r in runs.values()]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[e] for c in curves] for e in epochs]
        line, = ax.plot(epochs, [sum(y) / len(y) for y in ys], "o-", markersize=3,
                        label=f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.fill_between(epochs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
    if result.get("teacher_top1") is not None:
        ax.axhline(result["teacher_top1"], color="gray", linestyle=":",
                   label=f"teacher ({result['teacher_top1']:.1f}%)")
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val top-1 (%): mean over seeds, band min-max")
    ax.set_title(f"hcd compare: {Path(result['config']).name}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    _save(fig, Path(path))
