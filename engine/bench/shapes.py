"""The head and student shapes the benchmarks measure.

On a GPU: B and C per dataset (CIFAR-100: B=128, C=100; ImageNet: B=256, C=1000), D_p and D_t from the
shipped run configs (configs/<dataset>/*.yaml), so the benchmarks follow the model pairs users train.
D_s and D_t come from the configs' timm models built on the meta device (nothing allocated, loaded or
downloaded); the fused head's input widths follow the distiller's rule (hcd.engine.distiller.head_input_widths).
On CPU: small fixed shapes, and a tiny one for the Triton interpreter (slow: only its numerics mean anything).
Heads run as in training: the teacher feature x_teacher is frozen, so the head computes no dX for it.
"""
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from hcd.kernels.testing import Case

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"  # engine/bench/ -> the repository root
DATASET_BATCH = {"cifar100": 128, "imagenet": 256}  # configs/<dataset>/ -> the benchmark batch B
HEADLINE_CONFIG = "imagenet/swin_tiny-resnet18.yaml"  # the headline shape: B=256, C=1000, n=4
QUICK_PAIR = "swin_tiny-resnet18.yaml"                # --quick: this pair's widths only, per dataset

CPU_SHAPES = [Case(64, 100, 4, 256, 192, frozen_teacher_feature=True),
              Case(128, 100, 4, 768, 768, frozen_teacher_feature=True)]
INTERPRETER_SHAPE = Case(16, 10, 2, 32, 24)
STUDENT_SHAPES = [Case(128, 100, 1, 1, 1), Case(256, 1000, 1, 1, 1)]  # the student loss reads B and C only


@dataclass(frozen=True)
class HeadWidths:
    """One shipped config's head: C classes, the fused head's input widths Dp (x_student), Dt (x_teacher)."""
    config: str  # relative to configs/, e.g. "imagenet/deit_tiny-resnet18.yaml"
    C: int
    Dp: int
    Dt: int


@functools.lru_cache(maxsize=None)
def config_widths(root: Path = CONFIG_ROOT) -> Tuple[HeadWidths, ...]:
    """Every shipped CIFAR-100 / ImageNet config's head widths, in (dataset, file name) order."""
    from hcd.engine.config import load_config
    from hcd.engine.distiller import head_input_widths
    from hcd.engine.models import feature_widths
    found = []
    for dataset in DATASET_BATCH:
        for path in sorted((Path(root) / dataset).glob("*.yaml")):
            cfg = load_config(str(path))
            m = cfg.model
            d_s, d_t = feature_widths(m.teacher, m.student, m.num_classes, m.teacher_kwargs, m.student_kwargs)
            dp, dt = head_input_widths(d_s, d_t, cfg.head.cfm_hidden)
            found.append(HeadWidths(f"{dataset}/{path.name}", m.num_classes, dp, dt))
    if not found:
        raise FileNotFoundError(f"no run configs under {root}/{{{','.join(DATASET_BATCH)}}}: the benchmark "
                                "shapes come from them (run from a checkout of the repository)")
    return tuple(found)


def _shape(w: HeadWidths, n: int) -> Case:
    """As in training: the teacher feature is frozen, so the head computes no gradient for x_teacher."""
    return Case(DATASET_BATCH[w.config.split("/")[0]], w.C, n, w.Dp, w.Dt, frozen_teacher_feature=True)


def gpu_head_shapes(ns: Sequence[int] = (2, 4, 8), quick: bool = False) -> List[Case]:
    """One shape per distinct (B, C, Dp, Dt) of the shipped configs and per n, in config order (the plan
    sorts them); quick keeps the widths of QUICK_PAIR's configs only."""
    widths = [w for w in config_widths() if not quick or w.config.endswith("/" + QUICK_PAIR)]
    shapes = []
    for w in widths:
        for n in ns:
            s = _shape(w, n)
            if s not in shapes:
                shapes.append(s)
    return shapes


def configs_for(shape: Case) -> List[str]:
    """The shipped configs whose head has this shape's B, C, Dp and Dt (any n: n is a loss setting)."""
    return [w.config for w in config_widths() if _shape(w, shape.n) == shape]


def headline_shape() -> Case:
    """B=256, C=1000, n=4 with the widths of HEADLINE_CONFIG: the shape the profile and tile sweep use."""
    w = next(w for w in config_widths() if w.config == HEADLINE_CONFIG)
    return _shape(w, 4)


def shape_dict(case: Case) -> dict:
    """A shape as the results JSON writes it."""
    return {"B": case.B, "C": case.C, "n": case.n, "Dp": case.Dp, "Dt": case.Dt}
