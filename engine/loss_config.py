"""The run config's `loss` section: HCD's fields (hcd.kernels.HCDLossConfig) and one section per baseline
(docs/method.md, Baselines)."""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from hcd.kernels.config import HCDLossConfig

METHODS = ("hcd", "ofa", "dkd", "dist", "kd", "ce")  # docs/method.md, Baselines


@dataclass(frozen=True)
class DKDConfig:
    """DKD (Zhao et al. 2022): alpha*TCKD + beta*NCKD at temperature T, weighted min((epoch+1)/warmup, 1).
    Defaults: the reference code's CIFAR-100 setting; its ImageNet setting (configs/imagenet/r34_r18/dkd.yaml) is alpha 1, beta 0.5, T 1, warm-up 1."""
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: float = 20.0


@dataclass(frozen=True)
class DISTConfig:
    """DIST (Huang et al. 2022): T^2 * (beta * inter-class + gamma * intra-class relation loss).
    Defaults: ImageNet; CIFAR-100 uses beta = gamma = 2, T = 4."""
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 1.0


@dataclass(frozen=True)
class OFAConfig:
    """OFA-KD (Hao et al. 2023): a projector + Linear to C logits per used stage, each stage's logits and the
    student's trained with -sum_c ((p_t + 1_y)^eps - 1_y)_c log p_s,c."""
    eps: float = 1.0                      # eps of every stage's loss
    stage_eps: Optional[list] = None      # one eps per used stage (head.stages order), overriding eps
    logits_eps: float = 1.0               # eps of the loss on the student's own logits
    temperature: float = 1.0
    weight: float = 1.0                   # the OFA terms' weight (the CE keeps loss.ce_weight)


@dataclass(frozen=True)
class LossConfig(HCDLossConfig):
    """HCD's fields (hcd.kernels.HCDLossConfig: ce_weight and label_smoothing are every method's CE, kd_weight
    and kd_temperature KD's) and one section per baseline."""
    dkd: DKDConfig = field(default_factory=DKDConfig)
    dist: DISTConfig = field(default_factory=DISTConfig)
    ofa: OFAConfig = field(default_factory=OFAConfig)

    def hcd(self) -> HCDLossConfig:
        """The HCD fields alone (what the kernels take)."""
        return HCDLossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HCDLossConfig)})
