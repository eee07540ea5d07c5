"""Host-side launch arithmetic shared by the fused kernels, in plain Python.

Why not triton.cdiv / triton.next_power_of_2: in Triton 3.x they are constexpr functions, and a call from
Python goes through the JIT's argument unwrapping (microseconds each, several per launch). The head is
launch-bound at its real sizes, so the host path keeps to integer arithmetic.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(x - 1, 0).bit_length()


def row_num_warps(block: int) -> int:
    """Warps per row program: enough threads that a row stays ~8 fp32 values per thread per vector."""
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16
