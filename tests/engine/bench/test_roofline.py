"""The fused head's FLOP/byte model per mode, as the kernel rows and the roofline use it."""
from hcd.engine.bench.roofline import head_cost
from hcd.kernels.testing import Case


def test_cost_model_counts_the_three_gemms():
    case = Case(256, 1000, 4, 768, 768)
    gemm = 2 * case.B * case.n * case.C * (case.Dp + case.Dt)
    f_fwd, b_fwd = head_cost(case, 2, "forward")
    f_full, b_full = head_cost(case, 2, "full")
    assert gemm <= f_fwd < 1.2 * gemm
    assert 3 * gemm <= f_full < 3.3 * gemm and b_full > b_fwd > 0
    # as in training (hcd.engine.bench.shapes): a frozen teacher feature, dX over the Dp columns only
    frozen = Case(256, 1000, 4, 768, 768, frozen_teacher_feature=True)
    f_frozen, b_frozen = head_cost(frozen, 2, "full")
    assert f_frozen == f_full - 2 * case.B * case.n * case.C * case.Dt and b_frozen < b_full
    assert head_cost(frozen, 2, "forward") == (f_fwd, b_fwd)


def test_whole_loss_cost_per_mode():
    """hcd_loss's cost (4 stages + student): forward holds the Z GEMM, row kernel and sum; full adds the dX,
    dW and dz_s launches; the floor is the longer of compute and memory time."""
    from hcd.engine.bench.roofline import ROOFLINES, floor_ms, loss_cost
    from hcd.kernels.costs import loss_flops_bytes
    case = Case(256, 1000, 4, 768, 768, frozen_teacher_feature=True)
    launches = loss_flops_bytes(4, 256, 1000, 4, 768, 768, 2)
    assert loss_cost(case, 4, 2, "full") == launches["total"]
    fwd = loss_cost(case, 4, 2, "forward")
    assert fwd == tuple(sum(launches[k][i] for k in ("z_gemm", "row", "loss_sum")) for i in range(2))
    flops, moved = launches["total"]
    assert floor_ms(ROOFLINES["H200"], "bf16", (flops, moved)) == max(flops / 989e12, moved / 4800e9) * 1e3
    assert floor_ms(None, "bf16", (flops, moved)) is None
