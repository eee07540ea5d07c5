"""HCDLossConfig: every weight and switch of the HCD losses (names and defaults: docs/method.md, Defaults)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class HCDLossConfig:
    n_sublogits: int = 4            # n: sub-logits per stage
    temperature: float = 1.0        # T of the sub-logit KL
    kd_temperature: float = 1.0     # T_kd of the standard KD term
    label_smoothing: float = 0.1    # epsilon of every CE
    ol_threshold: float = 0.5       # theta of the orthogonality loss
    ce_weight: float = 1.0          # omega
    kd_weight: float = 1.0          # gamma
    sublogit_kl_weight: float = 6.0  # lambda
    ol_weight: float = 1.0          # beta
    student_scale: float = 1.0      # alpha_s
    teacher_scale: float = 1.0      # alpha_t
    detach_sublogit_target: bool = False

    def __post_init__(self):
        checks = {
            "n_sublogits": (isinstance(self.n_sublogits, int) and not isinstance(self.n_sublogits, bool)
                            and self.n_sublogits >= 1, "an integer >= 1"),
            "temperature": (self.temperature > 0, "> 0"),
            "kd_temperature": (self.kd_temperature > 0, "> 0"),
            "label_smoothing": (0.0 <= self.label_smoothing < 1.0, "in [0, 1)"),
        }
        for name, (ok, want) in checks.items():
            if not ok:
                raise ValueError(f"{name}: must be {want}, got {getattr(self, name)!r}")
