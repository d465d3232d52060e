"""Tolerances for the suite's numeric comparisons, each derived from the quantity compared, none tuned until green.

Float results differ across CPUs (AVX2 vs AVX-512 kernels), thread counts and libraries because floating-point
addition is not associative: a reduction of ``n`` terms summed in another order differs by at most ``γ_n · Σ|x_i|``
with ``γ_n = n·u / (1 - n·u)`` and ``u`` the unit roundoff (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §4.2). The suite therefore makes three kinds of claim, and each comparison says which it makes:

- **Bitwise** (``torch.equal``): only where the same kernels run on the same inputs in the same order — a resumed
  run against the uninterrupted one in the same process or on the same layout, a save/load round trip.
- **Mathematical equivalence** (ftrain == transformers, accumulation == big batch, N ranks == 1 process, compiled
  == eager): checked in **float64**, where the claim's own error is rounding and ``u = 2**-53``. ``FLOAT64`` allows
  ``2**-53 · 10**6 ≈ 1.1e-10`` relative: a reordered reduction over up to a million terms, or a few thousand
  operations in sequence each rounding once, while any real difference between the two computations (a missing
  term, a wrong count, a step of lr) is orders of magnitude above it.
- **Float32 as the point** (a float32 kernel against torch's float32 kernel, bf16 storage): the tolerance is derived
  from the quantity — from ``u = 2**-24`` and the number of reordered operations, or, after optimizer steps, from
  the size of the update (:func:`adam_drift`) — and the derivation is written next to the number.

Why the update size and not a fixed ``atol`` after Adam steps: Adam's update ``lr · m̂ / (√v̂ + ε)`` is ``≈ lr`` in
magnitude whatever the gradient's size, so an element whose gradient is rounding noise (a cancellation that lands on
``1e-9`` on one CPU and ``-1e-9`` on another) moves by ``±lr`` on each machine. A float32 ``atol`` of ``1e-6`` held
on one CPU and failed on the next for exactly that reason (issue 12).
"""

from __future__ import annotations

import torch

#: unit roundoff (half the machine epsilon) of each dtype: the largest relative error of one rounded operation.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

#: two float64 computations of the same mathematics: 10**6 unit roundoffs (see the module docstring).
FLOAT64 = {"rtol": 1e6 * UNIT_ROUNDOFF[torch.float64], "atol": 1e6 * UNIT_ROUNDOFF[torch.float64]}


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's ``γ_n = n·u / (1 - n·u)``: the relative bound on a sum of ``n`` terms in any order (relative to the
    sum of their magnitudes), or on ``n`` operations in sequence each rounding once."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, f"γ_{n} is unbounded in {dtype}: n·u = {nu}"
    return nu / (1 - nu)


def reduction_rtol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance for a value reduced over ``n`` terms in a different order on each side (a matmul's inner
    dimension, a loss summed over tokens, a mean over ranks): ``2·γ_n``, one bound for each side. It is relative to
    the sum of magnitudes, so use it for sums of like-signed terms (losses, norms, counts); for a difference of large
    terms the relative error can be larger."""
    return 2 * gamma(n, dtype)


def adam_drift(lr: float, steps: int) -> float:
    """The largest distance two correct float32 Adam(W) runs of ``steps`` steps can put between one parameter when
    their gradients differ only by rounding.

    Each step moves a parameter by ``lr · m̂ / (√v̂ + ε)``, at most ``≈ lr`` in size, and an element whose gradient is
    rounding noise can move ``+lr`` in one run and ``-lr`` in the other: ``2 · lr · steps``. That is the honest
    float32 bound after Adam steps; it is loose, which is why equivalence claims are checked in float64 instead.

    In float64 the same amplification (``lr / ε`` times the gradient's noise) acts on noise ``2**29`` times smaller:
    the worst float32 spread seen across CPUs (1.2e-6 after 8 Adam steps, issue 12) becomes ``2e-15``, and
    :data:`FLOAT64` leaves a factor ``5e4`` above it."""
    return 2.0 * lr * steps


def adam_loss_drift(lr: float, steps: int, grad_rtol: float, n_params: int, grad_norm: float) -> float:
    """First-order estimate of how far the *loss* of two float32 Adam(W) runs can drift apart in ``steps`` steps when
    their gradients differ by rounding of relative size ``grad_rtol`` (absolute; divide by the loss for a relative
    tolerance).

    :func:`adam_drift` bounds a parameter, and is loose because an element whose gradient is rounding noise moves
    ``±lr`` — but such an element has ``g_i ≈ 0`` and moves the loss by ``g_i · Δp_i ≈ 0``. In general a relative
    change ``δ_i`` of ``g_i`` changes the update by ``≤ 2·lr·min(1, δ_i)``, so the loss by ``≤ |g_i|·2·lr·δ_i =
    2·lr·|δg_i|``; summed over elements, with ``Σ|δg_i| ≤ grad_rtol·‖g‖₁`` (the rounding relative to the gradient's L1
    norm: the assumption of this estimate) and ``‖g‖₁ ≤ √N·‖g‖₂``, the loss moves by at most
    ``2·lr·steps·grad_rtol·√N·‖g‖₂`` with ``grad_norm`` the largest ``‖g‖₂`` seen."""
    return 2 * lr * steps * grad_rtol * n_params**0.5 * grad_norm
