"""Fused HCD head for one stage: CFM projection + SDD split/fusion + sub-logit CE/KL + orthogonality loss.

Launch plan (B rows, C classes, n sub-logits, N = n*C, D = Dp + Dt, e = activation bytes, w = weight bytes;
the GEMM launches are kernels/gemm.py's, the counts below are kernels/costs.py's model):
  forward
    1. _gemm_kernel     Z = x_s W[:, :Dp]^T + x_t W[:, Dp:]^T + b: two K ranges accumulated in one fp32
                        accumulator (no concatenation), Z stored fp32.      2*B*N*D FLOPs,
                        B*D*e + N*D*w + N*w + 4*B*N bytes.
    2. _head_row_kernel one program per row, all fp32 (the math: kernels/head_rows.py): for each group j
                        the fused Z~_j = a_s Z_j + a_t z_t,
                        its CE (label smoothing) and KL (temperature) statistics, the norm of the
                        masked group and its dot products with the earlier groups (reloaded from Z, which
                        sits in L2) -> the n x n Gram; then a second loop (reloading the groups of the
                        active OL pairs for the Gram gradient) writes dZ = a_s dL/dZ~ (fp32, per sample), the
                        fp32 dz_s (and dz_t = a_t sum_j dL/dZ~_j), and per-row loss partials.
                        ~60*B*N + 2*B*n*N FLOPs; compulsory bytes 4*B*N + 2*B*C*e + 8*B read,
                        4*B*N + 4*B*C (x2 with teacher grad) + 16*B written (group reloads hit L2);
                        a (B, C) soft target (SOFT) reads B*C entries instead of the 8*B label bytes.
    3. partials.sum(0)  (B, 4) -> (ce, kl, ol, total), four 0-dim outputs of one reduction.  16*B bytes.
                        No atomics, no host sync.
  backward (as in quack: dZ is saved, so the grad_output scale rides in the GEMM epilogues, a frozen
            weight costs nothing and a forward without backward never pays for the GEMMs)
    4. _gemm_kernel     dX = g * dZ W -> one (B, D) buffer, dx_s and dx_t its column views ((B, Dp) when
                        x_t is frozen, as in training: the teacher half of W is then never read).
                        2*B*N*D FLOPs, 4*B*N + N*D*w + B*D*e bytes.        (only if x_s or x_t need grad)
    5. _gemm_kernel     dW = g * dZ^T [x_s | x_t] (the two column ranges picked per tile) with fp32
                        accumulation, db = g * colsum(dZ) from the same tiles.   2*N*B*D FLOPs,
                        4*B*N + B*D*e + N*D*w + N*w bytes.                  (only if W or b need grad)
    6. torch.mul        (dz_s[, dz_t]) * g, rounded once into the logits dtype.  B*C*(4+e) bytes (x2).
  Six launches per stage and step: four heavy ones (1, 2, 4, 5) and two tiny ones (3: a (B, 4) reduction
  instead of atomics on one scalar; 6: an elementwise scale).

float64 inputs run the float64 eager reference instead: float64 is a debugging dtype and the kernels are
fp32 inside. An empty batch does too (nothing to launch).
"""
import torch
import triton
import triton.language as tl

from hcd.kernels import reference
from hcd.kernels._common import row_target
from hcd.kernels.gemm import _backward_dot, _gemm
from hcd.kernels.head_rows import head_row_terms
from hcd.kernels.launch import next_pow2, row_num_warps


@triton.jit
def _head_row_kernel(z_ptr, zt_ptr, zs_ptr, y_ptr, dz_ptr, dzl_ptr, loss_ptr,
                     B, C, n, alpha_s, alpha_t, eps, inv_T, T, theta,
                     w_ce, w_kl, w_ol, ce_weight, kl_weight, ol_weight, inv_bn, inv_b_pairs, inv_B,
                     KL_TARGET_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, WRITE_DZ: tl.constexpr,
                     SOFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    # w_ce = ce_weight/n, w_kl = kl_weight/n, w_ol = ol_weight/(n (n-1)) (0 when n = 1): per-SAMPLE weights.
    # dZ is stored B times the true gradient (1/B rides in the backward GEMMs' scale), so a 16-bit dZ is not
    # pushed into fp16's subnormal range at large B; the fp32 logits gradients take inv_B = 1/B here.
    # inv_bn = 1/(B n), inv_b_pairs = 1/(B max(n (n-1), 1)): the batch-means as per-row factors.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    zrow = row * C * n
    lrow = row * C
    zt = tl.load(zt_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    zs = tl.load(zs_ptr + lrow + offs, mask=mask, other=0.0).to(tl.float32)
    # an out-of-range label or a non-finite soft row (CUDA only): read safely, NaN CE; SOFT: y_ptr is (B, C)
    valid, is_y, t, sum_t = row_target(y_ptr, row, C, offs, mask, SOFT)
    ce_row, kl_row, ol_sum, dzs, sum_g = head_row_terms(
        z_ptr, dz_ptr, zrow, zt, zs, is_y, valid, t, sum_t, n, C, offs, mask, alpha_s, alpha_t, eps, inv_T, T,
        theta, w_ce, w_kl, w_ol, inv_B, KL_TARGET_GRAD, TEACHER_GRAD, WRITE_DZ, SOFT, BLOCK_C, BLOCK_N)
    tl.store(dzl_ptr + lrow + offs, dzs, mask=mask)
    if TEACHER_GRAD:
        tl.store(dzl_ptr + B * C + lrow + offs, (alpha_t * inv_B) * sum_g, mask=mask)

    ce_part = ce_row * inv_bn
    kl_part = kl_row * inv_bn
    ol_part = ol_sum * inv_b_pairs
    tl.store(loss_ptr + row * 4 + 0, ce_part)
    tl.store(loss_ptr + row * 4 + 1, kl_part)
    tl.store(loss_ptr + row * 4 + 2, ol_part)
    tl.store(loss_ptr + row * 4 + 3, ce_weight * ce_part + kl_weight * kl_part + ol_weight * ol_part)


def _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, *, teacher_grad, write_dz, num_warps=None):
    """Launch 2 of the plan: one program per row over Z (B, n*C) fp32; num_warps overrides the choice
    (bench/tile_sweep.py)."""
    B, C = z_t.shape
    n = cfg.n_sublogits
    block_c = next_pow2(C)
    _head_row_kernel[(B,)](
        z, z_t, z_s, target, dz, dzl, partials,
        B, C, n, float(cfg.student_scale), float(cfg.teacher_scale), float(cfg.label_smoothing),
        1.0 / cfg.temperature, float(cfg.temperature), float(cfg.ol_threshold),
        cfg.ce_weight / n, cfg.sublogit_kl_weight / n,
        cfg.ol_weight / (n * (n - 1)) if n > 1 else 0.0,
        float(cfg.ce_weight), float(cfg.sublogit_kl_weight), float(cfg.ol_weight),
        1.0 / (B * n), 1.0 / (B * max(n * (n - 1), 1)), 1.0 / B,
        KL_TARGET_GRAD=not cfg.detach_sublogit_target, TEACHER_GRAD=teacher_grad, WRITE_DZ=write_dz,
        SOFT=target.is_floating_point(), BLOCK_C=block_c, BLOCK_N=max(next_pow2(n), 2),
        num_warps=num_warps or row_num_warps(2 * block_c))


class _HCDHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, x_t, weight, bias, z_t, z_s, target, cfg):
        x_s, x_t, weight, z_t, z_s, target = (t.contiguous() for t in (x_s, x_t, weight, z_t, z_s, target))
        bias = bias.contiguous() if bias is not None else None
        B, Dp = x_s.shape
        C = z_t.shape[1]
        n = cfg.n_sublogits
        dev, act = x_s.device, x_s.dtype
        need = ctx.needs_input_grad
        need_dz = any(need[:4])

        # 1. Z in fp32, the two K ranges accumulated in one tile loop.
        z = torch.empty((B, n * C), dtype=torch.float32, device=dev)
        _gemm(z, x_s, weight[:, :Dp].t(), a2=x_t, b2=weight[:, Dp:].t(), bias=bias, dot_dtype=act)

        # 2. the row kernel: losses and all dL/dZ, dL/dz_s, dL/dz_t (unscaled by grad_output).
        # dZ stays fp32 whatever the activation dtype: a bf16 dZ puts dW outside the tolerance rule at the
        # ImageNet shape (3.6 % of max|dW| on an H200); see gemm._backward_dot.
        dz = torch.empty((B, n * C), dtype=torch.float32, device=dev) if need_dz else z
        dzl = torch.empty((2 if need[4] else 1, B, C), dtype=torch.float32, device=dev)
        partials = torch.empty((B, 4), dtype=torch.float32, device=dev)
        _row_launch(z, z_t, z_s, target, dz, dzl, partials, cfg, teacher_grad=bool(need[4]), write_dz=need_dz)

        ctx.save_for_backward(x_s, x_t, weight, dz if need_dz else None, dzl)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.act = act
        # 3. (ce, kl, ol, total) in one reduction, handed out as four outputs: the parts are marked
        # non-differentiable and grads are not materialised, so the backward gets total's gradient as is
        # (indexing one (4,) output would add a select-backward's zero-fill and copy launches per step).
        ce, kl, ol, total = partials.sum(0).unbind(0)
        ctx.mark_non_differentiable(ce, kl, ol)
        ctx.set_materialize_grads(False)
        return total, ce, kl, ol

    @staticmethod
    def backward(ctx, g, *_parts):
        x_s, x_t, weight, dz, dzl = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g is None:  # only total carries a gradient; nothing reached it
            return (None,) * 8
        # g = d out / d total, a 0-dim tensor read on the device (no host sync)
        act, Dp = ctx.act, x_s.shape[1]
        dx_s = dx_t = dw = db = dzt = dzs = None
        inv_b = 1.0 / x_s.shape[0]  # dZ was stored per sample (see the row kernel)
        if need[0] or need[1]:  # 4. dX = g dZ W; both column ranges in one launch only when both are wanted
            cols = slice(0, weight.shape[1]) if need[1] else slice(0, Dp)  # x_teacher is frozen in training
            dx = torch.empty((x_s.shape[0], cols.stop), dtype=act, device=x_s.device)
            _gemm(dx, dz, weight[:, cols], scale=g, alpha=inv_b, **_backward_dot(act))
            dx_s = dx[:, :Dp] if need[0] else None
            dx_t = dx[:, Dp:] if need[1] else None
        if need[2]:  # 5. dW = g dZ^T [x_s | x_t] (+ db from the same tiles)
            dw = torch.empty_like(weight)
            db = torch.empty((weight.shape[0],), dtype=ctx.bias_dtype, device=dz.device) if need[3] else None
            _gemm(dw, dz.t(), x_s, b2=x_t, split_n=True, scale=g, alpha=inv_b, colsum=db, **_backward_dot(act))
        elif need[3]:  # trainable bias with a frozen weight: no GEMM needed
            db = (dz.float().sum(0) * (g * inv_b)).to(ctx.bias_dtype)
        if need[4] or need[5]:  # 6. logits gradients, scaled and rounded once
            out = torch.empty(dzl.shape, dtype=act, device=dzl.device)
            torch.mul(dzl, g, out=out)
            dzs = out[0] if need[5] else None
            dzt = out[1] if need[4] else None
        return dx_s, dx_t, dw, db, dzt, dzs, None, None


def hcd_head_loss_triton(x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg):
    """(total, ce, kl, ol) of one stage; total carries the graph, ce/kl/ol are detached and unweighted."""
    args = (x_student, x_teacher, weight, bias, teacher_logits, student_logits, target, cfg)
    if x_student.dtype == torch.float64 or x_student.shape[0] == 0:
        return reference.hcd_head_loss_eager(*args)
    return _HCDHead.apply(*args)
