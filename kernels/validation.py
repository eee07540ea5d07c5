"""Input checks shared by every backend: bad input is a ValueError naming the argument, never a kernel crash."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name, t, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not one of float16/bfloat16/float32/float64")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from the other inputs' {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: device {t.device} differs from the other inputs' {device}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def _check_weight(name, weight, dtype, device):
    """Parameters may stay float32 (master weights under autocast) while activations are 16-bit."""
    _check_float(name, weight, None, device)
    if weight.dtype not in (dtype, torch.float32) or (dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"{name}: dtype {weight.dtype} must be {dtype} or float32 for {dtype} activations")


def check_target(target, batch, num_classes, device):
    """Labels: (B,) int64 on the same device; the range is checked on CPU only (no host sync on CUDA).
    Or soft targets (docs/method.md, Soft targets): a (B, C) float probability tensor (check_soft_target).

    On CUDA an out-of-range label is not caught here; every backend turns its rows into NaN losses
    instead of reading out of bounds, so a bad label shows up as a non-finite loss.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        check_soft_target(target, batch, num_classes, device)
        return
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype {target.dtype}, expected torch.int64 class indices or (B, C) float "
                         "probabilities")
    if target.device != device:
        raise ValueError(f"target: device {target.device} differs from the other inputs' {device}")
    _check_shape("target", target, (batch,))
    if target.device.type == "cpu" and batch > 0:
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target: label {bad} outside [0, {num_classes})")


def check_soft_target(target, batch, num_classes, device):
    """Soft targets: (B, C), any of float16/bfloat16/float32/float64 whatever the logits' dtype (the kernels
    read them as fp32), on the logits' device, a constant (no gradient is returned for it). On CPU the rows
    must be finite and >= 0; on CUDA they are not read here (no host sync): a non-finite row gives a NaN CE
    row (every backend), like an out-of-range label."""
    _check_float("target", target, None, device)
    if target.dim() != 2:
        raise ValueError(f"target: float targets are (B, C) probabilities, got shape {tuple(target.shape)}")
    _check_shape("target", target, (batch, num_classes))
    if torch.is_grad_enabled() and target.requires_grad:
        raise ValueError("target: requires grad, but soft targets are constants (no gradient is returned for "
                         "them); pass it detached")
    if target.device.type == "cpu" and target.numel() > 0:
        if not bool(torch.isfinite(target).all()):
            raise ValueError("target: soft target has a non-finite entry")
        if bool((target < 0).any()):
            raise ValueError("target: soft target has a negative entry (probabilities must be >= 0)")


def check_student_inputs(student_logits, teacher_logits, target):
    _check_float("student_logits", student_logits, None, None)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits: expected 2-D (B, C), got shape {tuple(student_logits.shape)}")
    dtype, device = student_logits.dtype, student_logits.device
    _check_float("teacher_logits", teacher_logits, dtype, device)
    _check_shape("teacher_logits", teacher_logits, student_logits.shape)
    check_target(target, student_logits.shape[0], student_logits.shape[1], device)


def _check_teacher_and_logits(x_teacher, teacher_logits, student_logits, B, dtype, device):
    """The inputs every head shares: x_teacher (B, Dt), both logits (B, C); returns (Dt, C)."""
    _check_float("x_teacher", x_teacher, dtype, device)
    if x_teacher.dim() != 2 or x_teacher.shape[0] != B:
        raise ValueError(f"x_teacher: expected shape ({B}, Dt), got {tuple(x_teacher.shape)}")
    _check_float("teacher_logits", teacher_logits, dtype, device)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != B:
        raise ValueError(f"teacher_logits: expected shape ({B}, C), got {tuple(teacher_logits.shape)}")
    C = teacher_logits.shape[1]
    _check_float("student_logits", student_logits, dtype, device)
    _check_shape("student_logits", student_logits, (B, C))
    return x_teacher.shape[1], C


def check_head_inputs(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    """Validate hcd_head_loss inputs; returns (B, C, n, Dp, Dt)."""
    _check_float("x_student", x_student, None, None)
    if x_student.dim() != 2:
        raise ValueError(f"x_student: expected 2-D (B, Dp), got shape {tuple(x_student.shape)}")
    dtype, device = x_student.dtype, x_student.device
    B, Dp = x_student.shape
    Dt, C = _check_teacher_and_logits(x_teacher, teacher_logits, student_logits, B, dtype, device)
    n = cfg.n_sublogits
    _check_weight("weight", weight, dtype, device)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D (n*C, Dp+Dt), got shape {tuple(weight.shape)}")
    if weight.shape[0] != n * C:
        raise ValueError(f"weight: {weight.shape[0]} rows but n_sublogits*C = {n}*{C} = {n * C}")
    if weight.shape[1] != Dp + Dt:
        raise ValueError(f"weight: {weight.shape[1]} columns but Dp+Dt = {Dp}+{Dt} = {Dp + Dt}")
    if bias is not None:
        _check_float("bias", bias, weight.dtype, device)
        _check_shape("bias", bias, (n * C,))
    check_target(target, B, C, device)
    return B, C, n, Dp, Dt


def check_loss_inputs(x_students, x_teacher, weights, biases, teacher_logits, student_logits, target, cfg, stages):
    """Validate hcd_loss inputs (attribute reads only, plus the label range on CPU); returns S.

    The teacher side is frozen in hcd_loss (see hcd.kernels.hcd_step): a teacher input that requires grad
    while autograd records is refused rather than silently given no gradient."""
    S, B, Dp, dtype, device = _check_stages(x_students)
    Dt, C = _check_teacher_and_logits(x_teacher, teacher_logits, student_logits, B, dtype, device)
    N, D = cfg.n_sublogits * C, Dp + Dt
    _check_weight("weights", weights, dtype, device)
    if tuple(weights.shape) != (S, N, D):
        raise ValueError(f"weights: expected shape (S, n_sublogits*C, Dp+Dt) = ({S}, {N}, {D}), "
                         f"got {tuple(weights.shape)}")
    if biases is not None:
        _check_float("biases", biases, weights.dtype, device)
        _check_shape("biases", biases, (S, N))
    if stages is not None and len(stages) != S:
        raise ValueError(f"stages: {len(stages)} names for {S} stages")
    if torch.is_grad_enabled():
        for name, t in (("x_teacher", x_teacher), ("teacher_logits", teacher_logits)):
            if t.requires_grad:
                raise ValueError(f"{name}: requires grad, but hcd_loss treats the teacher as frozen and returns "
                                 "no teacher gradient; pass it detached (hcd_head_loss and student_loss do "
                                 "return teacher gradients)")
    check_target(target, B, C, device)
    return S


def _check_stages(x_students):
    """(S, B, Dp, dtype, device) of an (S, B, Dp) tensor or a sequence of S equal-shaped (B, Dp) tensors."""
    if isinstance(x_students, torch.Tensor):
        _check_float("x_students", x_students, None, None)
        if x_students.dim() != 3 or x_students.shape[0] == 0:
            raise ValueError(f"x_students: expected (S, B, Dp) with S >= 1, got shape {tuple(x_students.shape)}")
        return (*x_students.shape, x_students.dtype, x_students.device)
    if not isinstance(x_students, (list, tuple)) or not x_students:
        raise ValueError("x_students: expected an (S, B, Dp) tensor or a non-empty sequence of (B, Dp) tensors")
    first = x_students[0]
    _check_float("x_students[0]", first, None, None)
    if first.dim() != 2:
        raise ValueError(f"x_students[0]: expected 2-D (B, Dp), got shape {tuple(first.shape)}")
    for i, t in enumerate(x_students[1:], 1):
        _check_float(f"x_students[{i}]", t, first.dtype, first.device)
        _check_shape(f"x_students[{i}]", t, first.shape)
    return (len(x_students), *first.shape, first.dtype, first.device)


def check_baseline_inputs(loss, name, logits, teacher_logits, target, **params):
    """Validate a baseline loss's inputs (dkd_loss, dist_loss, ofa_loss); returns the (B,) int64 labels.

    name is the first argument's name (OFA calls it "logits"); target is None for DIST, else (B,) int64 labels
    or (B, C) probabilities (mixup / cutmix), whose argmax is the label as in the reference code. The teacher
    is frozen in these losses: a teacher_logits that requires grad while autograd records is refused.
    params are the float hyperparameters; "temperature" must be > 0."""
    _check_float(name, logits, None, None)
    if logits.dim() != 2:
        raise ValueError(f"{name}: expected 2-D (B, C), got shape {tuple(logits.shape)}")
    B, C = logits.shape
    if C < 2:
        raise ValueError(f"{name}: {loss} needs at least 2 classes, got shape {tuple(logits.shape)}")
    _check_float("teacher_logits", teacher_logits, logits.dtype, logits.device)
    _check_shape("teacher_logits", teacher_logits, logits.shape)
    if torch.is_grad_enabled() and teacher_logits.requires_grad:
        raise ValueError(f"teacher_logits: requires grad, but {loss} treats the teacher as frozen and returns no "
                         "teacher gradient; pass it detached")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
    if params.get("temperature", 1.0) <= 0:
        raise ValueError(f"temperature: must be > 0, got {params['temperature']!r}")
    if target is None:
        return None
    check_target(target, B, C, logits.device)
    return target.argmax(dim=1) if target.is_floating_point() else target
