"""Host-side helpers of the launchers.

NOTE: [host arithmetic] ``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction
objects (triton 3.6 and 3.9): about 5 us and 3 us per call from Python, against 0.1 us for the
plain integer expression.  A statistics launch computed its tile shape with a dozen of them: on
ResNet-18 (82 statistics hooks, launches stubbed, a 2-core CPU) the hooks' host time fell from 160
to 99 us per hook with these instead.
"""
import os


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 when the kernels were
    decorated (at import), which fixed them as interpreted or compiled for the process."""
    return _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
