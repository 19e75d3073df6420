"""The cap on σ of the last noisy sampling step (Bao et al. 2022's code), torch-free.

Their sampler (sample_dtdpm, `clip_sigma_idx: 1`, `clip_pixel: y`) clamps σ² of the step to
x_{τ_1}, the first kept index, to (2y/255 · √(π/2))², so that E|σ ε| = σ √(2/π) ≤ 2y/255: y
levels of 0..255 on data in [−1, 1]. y = 2 in their CIFAR-10 (LS) runs, 1 otherwise. The samplers
apply it on every DDIM chain and on ancestral chains of K < T steps; the full T-step chain is
DDPM's Algorithm 2. Kept free of torch so that the config, the records and the report can say
what the samplers do without importing it.
"""

from __future__ import annotations

import math

# Bao et al. 2022, their code's y for data other than CIFAR-10 (LS), where it is 2
DEFAULT_LAST_SIGMA_CAP_Y = 1.0


# Bao et al. 2022, code (sample_dtdpm): σ² ≤ (2y/255 · √(π/2))² on the step to x_{τ_1}
def last_sigma_cap(y: float) -> float:
    """The largest noise std σ of the step to x_{τ_1}, for a mean |σ ε| of y pixel levels."""
    if not y > 0:
        raise ValueError(f"last_sigma_cap_y must be > 0 (pixel levels) or None, got {y}")
    return 2.0 * y / 255.0 * math.sqrt(math.pi / 2.0)


def last_sigma_cap_of(T: int, steps: int, ddim: bool, y: float | None) -> float | None:
    """The cap a chain of `steps` of T applies (None: none): DDIM always, ancestral if K < T."""
    if y is None or (not ddim and steps >= T):
        return None
    return last_sigma_cap(y)
