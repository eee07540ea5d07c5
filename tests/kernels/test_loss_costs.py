"""hcd_loss's FLOP/byte model (kernels/costs.py: loss_flops_bytes), counted by hand from the launch plan in
kernels/hcd_step.py's docstring at a tiny shape, and its relation to the per-stage head model."""
from hcd.kernels.costs import head_flops_bytes, loss_flops_bytes


def test_loss_cost_counts_at_a_small_shape():
    """S=2 stages, B=2, C=3, n=2, Dp=4, Dt=5 (N = 6, D = 9, K = 6 + 3*S = 12 partial columns), 2-byte
    activations and logits, a float32 weight and bias (4 bytes)."""
    fb = loss_flops_bytes(2, 2, 3, 2, 4, 5, 2, weight_bytes=4)
    # Z[s] = x_s[s] W[s]^T + b[s]: 2*S*B*N*D; reads x_s 2*2*4*2 = 32 and x_t once 2*5*2 = 20, W 2*6*9*4 = 432,
    # b 2*6*4 = 48; writes Z fp32 2*2*6*4 = 96
    assert fb["z_gemm"] == (432, 628)
    # row: S*(60*B*N + 2*B*n*N) + 25*B*C = 2*(720 + 48) + 150; reads Z 96, z_t and z_s once 2*(2*3*2) = 24,
    # labels 2*8 = 16; writes dZ 96, the per-stage dz_s shares fp32 2*2*3*4 = 48, partials B*S*K*4 = 192
    assert fb["row"] == (1686, 472)
    assert fb["loss_sum"] == (48, 240)         # B*S*K adds; reads the partials 192, writes K floats 48
    # dX over the Dp columns: 2*S*B*N*Dp; reads dZ 96, W[:, :, :Dp] 2*6*4*4 = 192; writes dX 2*2*4*2 = 32
    assert fb["dx_gemm"] == (192, 320)
    # dW = dZ^T [x_s | x_t] + S*B*N adds for db; reads dZ 96, x 52; writes dW 432, db 48
    assert fb["dw_gemm"] == (432 + 24, 628)
    # dz_s = g * sum_s shares: (S + 1)*B*C; reads the fp32 shares 48, writes 2-byte dz_s 12
    assert fb["dz_sum"] == (18, 60)
    assert fb["total"] == (2832, 2348)
    no_bias = loss_flops_bytes(2, 2, 3, 2, 4, 5, 2, weight_bytes=4, bias=False)  # no b to read, no db to write
    assert no_bias["z_gemm"] == (432, 580) and no_bias["dw_gemm"] == (456, 580)


def test_loss_gemms_are_the_heads_gemms_times_s():
    """At the ImageNet shape the three grouped GEMMs do S times one stage's GEMM work (frozen teacher
    feature), and the whole loss moves fewer bytes than S separate heads (x_teacher and the logits once)."""
    S, B, C, n, Dp, Dt = 4, 256, 1000, 4, 768, 768
    loss = loss_flops_bytes(S, B, C, n, Dp, Dt, 2)
    head = head_flops_bytes(B, C, n, Dp, Dt, 2, x_teacher_grad=False)
    for launch in ("z_gemm", "dx_gemm", "dw_gemm"):
        assert loss[launch][0] == S * head[launch][0], launch
    assert loss["total"][1] < S * head["total"][1]


def test_soft_targets_read_the_target_rows():
    """A (B, C) soft target replaces the 8-byte label per row with B*C entries of its dtype, in every row launch
    (B=2, C=3: labels 16 bytes, a float32 target 24), and changes nothing else."""
    from hcd.kernels.costs import student_flops_bytes
    for fn, args in ((loss_flops_bytes, (2, 2, 3, 2, 4, 5, 2)), (head_flops_bytes, (2, 3, 2, 4, 5, 2)),
                     (student_flops_bytes, (2, 3, 2))):
        labels, soft = fn(*args), fn(*args, soft_target_bytes=4)
        assert soft["row"] == (labels["row"][0], labels["row"][1] - 16 + 24), fn.__name__
        assert all(soft[k] == labels[k] for k in labels if k not in ("row", "total")), fn.__name__
