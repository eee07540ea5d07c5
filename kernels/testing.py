"""Numerics check of a backend against the float64 reference: inputs, runs and the tolerance rule.

Shared by tests/kernels (through tests/kernels/helpers.py), `hcd verify` and the benchmarks, so that all
three judge the kernels the same way. Imports only torch and kernels.

Tolerance rule (the one of apple/ml-cross-entropy): for every output (loss, each gradient), with ref the
float64 reference run on float64 copies of the same inputs,
    max|ours - ref|  <=  max|eager - ref|  +  MARGIN[dtype] * max|ref|  +  1e-12
where eager is hcd.kernels.reference run on the inputs in their own dtype. MARGIN is relative to the output's
scale (a normwise bound: single elements near zero are not held to a relative bound). Why the margins:
- float32: 1e-5, the "tight" bound. Both sides compute in fp32; only summation order differs.
- float16 / bfloat16: 2 units of the dtype's rounding (2^-11 and 2^-8). The eager reference upcasts
  everything to fp32 and rounds only the returned gradients; the fused path also rounds dZ to TF32 for
  dX = dZ W and dW = dZ^T X, and a weight kept in float32 to the activation dtype for the forward GEMM
  (as autocast does). Each adds at most about one rounding of the output's scale; 2 units cover it with
  room for summation order.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from hcd.kernels.config import HCDLossConfig

MARGIN = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}

# Output label -> input name whose gradient it is (None: the loss itself).
HEAD_OUTPUTS = {"loss": None, "ce": None, "kl": None, "ol": None, "dx_s": "x_student", "dx_t": "x_teacher",
                "dW": "weight", "db": "bias", "dz_t": "teacher_logits", "dz_s": "student_logits"}
STUDENT_OUTPUTS = {"loss": None, "ce": None, "kd": None, "dz_s": "student_logits", "dz_t": "teacher_logits"}
# hcd_loss: the loss parts come from its parts dict; the teacher side is frozen there (no dz_t, no dx_t)
LOSS_OUTPUTS = {"loss": None, "dx_s": "x_students", "dW": "weights", "db": "biases", "dz_s": "student_logits"}
# dkd_loss / dist_loss / ofa_loss: the loss and the gradient of the first argument (the teacher is frozen)
BASELINE_OUTPUTS = {"loss": None, "dz_s": "student_logits"}
# each baseline's tensor arguments, in order, as make_inputs names them; the engine's defaults
BASELINE_ARGS = {"dkd": ("student_logits", "teacher_logits", "target"),
                 "dist": ("student_logits", "teacher_logits"),
                 "ofa": ("student_logits", "teacher_logits", "target")}
BASELINE_DEFAULTS = {"dkd": dict(alpha=1.0, beta=8.0, temperature=4.0),
                     "dist": dict(beta=1.0, gamma=1.0, temperature=1.0),
                     "ofa": dict(eps=1.0, temperature=1.0)}


@dataclass(frozen=True)
class Case:
    """One input configuration. For student_loss only B, C and the logit options matter."""
    B: int
    C: int
    n: int = 4
    Dp: int = 16
    Dt: int = 24
    bias: bool = True
    weight_fp32: bool = False      # weight (and bias) float32 while activations are 16-bit
    teacher_grad: bool = False     # teacher_logits.requires_grad
    frozen_teacher_feature: bool = False  # x_teacher without grad, as in training (the teacher is frozen)
    offset: float = 0.0            # added to every teacher and student logit
    confident: bool = False        # one logit per row +30 (p_y -> 1)
    same: bool = False             # student_logits = teacher_logits
    seed: int = 0
    soft: str = ""                 # "": int64 labels; else a (B, C) float32 soft target of kind SOFT_KINDS

    def label(self) -> str:
        extras = [k for k in ("weight_fp32", "teacher_grad", "frozen_teacher_feature", "confident", "same")
                  if getattr(self, k)]
        extras += ["no-bias"] if not self.bias else []
        extras += [f"soft={self.soft}"] if self.soft else []
        extras += [f"offset={self.offset:g}"] if self.offset else []
        return f"B={self.B} C={self.C} n={self.n} Dp={self.Dp} Dt={self.Dt}" + "".join(f" {e}" for e in extras)


def make_inputs(case: Case, dtype: torch.dtype, device="cpu") -> dict:
    """Leaf tensors for hcd_head_loss (student_loss uses the logits and target), created in fp32 then cast."""
    g = torch.Generator().manual_seed(case.seed)
    B, C, n, D = case.B, case.C, case.n, case.Dp + case.Dt

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    zt = rand(B, C, scale=3.0)
    zs = zt.clone() if case.same else rand(B, C, scale=3.0)
    y = torch.randint(0, C, (B,), generator=g)
    if case.confident:
        rows = torch.arange(B)
        zt[rows, y] += 30.0
        zs[rows, y] += 30.0
    zt += case.offset
    zs += case.offset
    wdtype = torch.float32 if case.weight_fp32 else dtype
    inputs = {
        "x_student": rand(B, case.Dp).to(dtype),
        "x_teacher": rand(B, case.Dt).to(dtype),
        "weight": rand(n * C, D, scale=D ** -0.5).to(wdtype),
        "bias": rand(n * C, scale=0.1).to(wdtype) if case.bias else None,
        "teacher_logits": zt.to(dtype),
        "student_logits": zs.to(dtype),
        "target": y,
    }
    if case.soft:  # drawn last: the label cases' inputs stay those of the same seed
        inputs["target"] = soft_target(case.soft, y, C, g)
    out = {}
    for name, t in inputs.items():
        if t is None or name == "target":
            out[name] = None if t is None else t.to(device)
            continue
        t = t.to(device)
        frozen = (name == "teacher_logits" and not case.teacher_grad) or \
                 (name == "x_teacher" and case.frozen_teacher_feature)
        out[name] = t.requires_grad_(not frozen)
    return out


# Soft targets (docs/method.md, Soft targets), built around the labels y (so `confident` lifts y's logit):
# mixup: timm's Mixup, lam onehot(y) + (1 - lam) onehot(y.flip(0)) with one lam in [0.2, 0.8] per batch;
# tie: the same at lam = 0.5 (argmax ties: the OL mask takes the first maximal class); dense: Dirichlet(1)
# rows; onehot: onehot(y) (must equal the label path); unnormalised: 0.6 * a dense row (not renormalised).
SOFT_KINDS = ("mixup", "tie", "dense", "onehot", "unnormalised")


def soft_target(kind: str, y: torch.Tensor, C: int, g: torch.Generator) -> torch.Tensor:
    """A (B, C) float32 soft target of one of SOFT_KINDS around the labels y, drawn from g."""
    one = torch.nn.functional.one_hot(y, C).float()
    if kind == "onehot":
        return one
    if kind in ("dense", "unnormalised"):
        e = -torch.log(torch.rand(len(y), C, generator=g))
        return e / e.sum(1, keepdim=True) * (0.6 if kind == "unnormalised" else 1.0)
    if kind not in ("mixup", "tie"):
        raise ValueError(f"soft: {kind!r} is not one of {', '.join(SOFT_KINDS)}")
    lam = 0.5 if kind == "tie" else 0.2 + 0.6 * torch.rand((), generator=g).item()
    return lam * one + (1.0 - lam) * one.flip(0)


def as_float64(inputs: dict) -> dict:
    """float64 leaf copies (same values, same requires_grad) for the reference run."""
    out = {}
    for name, t in inputs.items():
        if t is None or not t.is_floating_point():
            out[name] = t
        else:
            out[name] = t.detach().to(torch.float64).requires_grad_(t.requires_grad)
    return out


def _fresh(inputs: dict) -> dict:
    return {k: (t.detach().clone().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point()
                else t) for k, t in inputs.items()}


def _run(loss_fn, names, labels, inputs, cfg, backend, grad_scale) -> dict:
    """loss_fn(*inputs[names], cfg) on fresh leaves: its total, parts and the gradients of grad_scale * total,
    keyed by the labels (an input without a gradient has no entry)."""
    t = _fresh({k: inputs[k] for k in names})
    total, parts = loss_fn(*(t[k] for k in names), cfg, backend=backend)
    (total * grad_scale).backward()
    return _collect(labels, t, total, parts)


def run_head(inputs: dict, cfg: HCDLossConfig, backend: str, grad_scale: float = 1.0) -> dict:
    """Loss parts and gradients of grad_scale * total, keyed by HEAD_OUTPUTS labels (missing = no grad)."""
    from hcd.kernels import hcd_head_loss
    names = ("x_student", "x_teacher", "weight", "bias", "teacher_logits", "student_logits", "target")
    return _run(hcd_head_loss, names, HEAD_OUTPUTS, inputs, cfg, backend, grad_scale)


def run_student(inputs: dict, cfg: HCDLossConfig, backend: str, grad_scale: float = 1.0) -> dict:
    from hcd.kernels import student_loss
    names = ("student_logits", "teacher_logits", "target")
    return _run(student_loss, names, STUDENT_OUTPUTS, inputs, cfg, backend, grad_scale)


def make_loss_inputs(case: Case, stages: int, dtype: torch.dtype, device="cpu") -> dict:
    """hcd_loss inputs for S stages: stage s's x_student, weight and bias are make_inputs's at seed
    case.seed + s, stacked to (S, ...) leaves; the teacher side (frozen, whatever the case says), the
    student logits and the labels are stage 0's."""
    heads = [make_inputs(replace(case, seed=case.seed + s, teacher_grad=False, frozen_teacher_feature=True), dtype,
                         device) for s in range(stages)]

    def stacked(name):
        return None if heads[0][name] is None else torch.stack([h[name].detach() for h in heads]).requires_grad_(True)
    return {"x_students": stacked("x_student"), "x_teacher": heads[0]["x_teacher"], "weights": stacked("weight"),
            "biases": stacked("bias"), **{k: heads[0][k] for k in ("teacher_logits", "student_logits", "target")}}


def run_loss(inputs: dict, cfg: HCDLossConfig, backend: str, grad_scale: float = 1.0) -> dict:
    """hcd_loss's total, every part and its gradients, keyed by LOSS_OUTPUTS labels and part names."""
    from hcd.kernels import hcd_loss
    names = ("x_students", "x_teacher", "weights", "biases", "teacher_logits", "student_logits", "target")
    return _run(hcd_loss, names, LOSS_OUTPUTS, inputs, cfg, backend, grad_scale)


def run_baseline(loss: str, inputs: dict, params: dict, backend: str, grad_scale: float = 1.0) -> dict:
    """hcd.kernels.<loss>_loss (loss: "dkd" | "dist" | "ofa") with params: its value and dz_s."""
    import hcd.kernels
    fn = getattr(hcd.kernels, f"{loss}_loss")

    def call(*args, backend):  # _run's calling convention; args end with its (unused) cfg
        return fn(*args[:-1], **params, backend=backend), {}
    return _run(call, BASELINE_ARGS[loss], BASELINE_OUTPUTS, inputs, None, backend, grad_scale)


def check_baseline(loss: str, case: Case, dtype: torch.dtype, device="cpu", backend="triton", grad_scale: float = 1.0,
                   **params) -> list:
    """Rows of the tolerance rule for a baseline on one case (teacher frozen; params default to the engine's)."""
    params = {**BASELINE_DEFAULTS[loss], **params}
    inputs = make_inputs(replace(case, n=1, Dp=1, Dt=1, teacher_grad=False), dtype, device)
    ref = run_baseline(loss, as_float64(inputs), params, "eager", grad_scale)
    eager = run_baseline(loss, inputs, params, "eager", grad_scale)
    ours = run_baseline(loss, inputs, params, backend, grad_scale)
    return compare(ours, eager, ref, dtype)


def _collect(labels: dict, tensors: dict, total, parts) -> dict:
    out = {"loss": total.detach()}
    out.update({k: v.detach() for k, v in parts.items()})
    for label, name in labels.items():
        if name is not None and tensors.get(name) is not None and tensors[name].grad is not None:
            out[label] = tensors[name].grad
    return out


@dataclass
class Row:
    output: str
    max_abs: float
    max_rel: float     # max_abs / max|ref|
    tol: float
    ok: bool


def compare(ours: dict, eager: dict, ref: dict, dtype: torch.dtype) -> list:
    """Apply the tolerance rule to every output present in ref; a missing or non-finite output fails."""
    rows = []
    for label, r in ref.items():
        r = r.double().cpu()
        scale = r.abs().max().item() if r.numel() else 0.0
        base = (eager[label].double().cpu() - r).abs().max().item() if label in eager and r.numel() else 0.0
        tol = base + MARGIN[dtype] * scale + 1e-12
        if label not in ours or ours[label].shape != r.shape:
            rows.append(Row(label, float("inf"), float("inf"), tol, False))
            continue
        o = ours[label].double().cpu()
        err = (o - r).abs().max().item() if r.numel() else 0.0
        ok = bool(torch.isfinite(o).all()) and err <= tol
        rows.append(Row(label, err, err / scale if scale else err, tol, ok))
    return rows


def check_head(case: Case, cfg: HCDLossConfig, dtype: torch.dtype, device="cpu", backend="triton",
               grad_scale: float = 1.0) -> list:
    """Rows of the tolerance rule for hcd_head_loss on one case (cfg.n_sublogits is taken from the case)."""
    cfg = replace(cfg, n_sublogits=case.n)
    inputs = make_inputs(case, dtype, device)
    ref = run_head(as_float64(inputs), cfg, "eager", grad_scale)
    eager = run_head(inputs, cfg, "eager", grad_scale)
    ours = run_head(inputs, cfg, backend, grad_scale)
    return compare(ours, eager, ref, dtype)


def check_student(case: Case, cfg: HCDLossConfig, dtype: torch.dtype, device="cpu", backend="triton",
                  grad_scale: float = 1.0) -> list:
    inputs = make_inputs(replace(case, n=1, Dp=1, Dt=1), dtype, device)
    ref = run_student(as_float64(inputs), cfg, "eager", grad_scale)
    eager = run_student(inputs, cfg, "eager", grad_scale)
    ours = run_student(inputs, cfg, backend, grad_scale)
    return compare(ours, eager, ref, dtype)


def check_loss(case: Case, cfg: HCDLossConfig, dtype: torch.dtype, device="cpu", backend="triton",
               grad_scale: float = 1.0, stages: int = 2) -> list:
    """Rows of the tolerance rule for hcd_loss over `stages` heads of this case (n from the case)."""
    cfg = replace(cfg, n_sublogits=case.n)
    inputs = make_loss_inputs(case, stages, dtype, device)
    ref = run_loss(as_float64(inputs), cfg, "eager", grad_scale)
    eager = run_loss(inputs, cfg, "eager", grad_scale)
    ours = run_loss(inputs, cfg, backend, grad_scale)
    return compare(ours, eager, ref, dtype)


def failures(rows: list) -> list:
    return [r for r in rows if not r.ok]


def format_rows(rows: list, prefix: Optional[str] = None) -> str:
    lines = []
    for r in rows:
        mark = "ok" if r.ok else "FAIL"
        lines.append(f"{prefix + '  ' if prefix else ''}{r.output:<5} max_abs={r.max_abs:.3e} "
                     f"max_rel={r.max_rel:.3e} tol={r.tol:.3e} {mark}")
    return "\n".join(lines)
