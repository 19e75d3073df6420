"""Published CIFAR-10 numbers the report prints beside ours (from the papers; see REFERENCE.md).

These are CIFAR-10 figures at full scale (35.7M parameters, 800k steps, 50,000 samples,
Inception-v3 FID): context for the measured numbers, never a comparison on equal terms.
"""

from __future__ import annotations

SOURCE = "Ho et al. 2020 (DDPM), CIFAR-10, 50,000 samples, Inception-v3 FID vs the training set"

# DDPM Table 1: model -> (IS, FID, NLL test bits/dim (train))
TABLE1 = [
    {"model": "L, fixed isotropic Σ (L_vlb)", "IS": "7.67 ± 0.13", "FID": 13.51,
     "NLL bits/dim test (train)": "≤ 3.70 (3.69)"},
    {"model": "L_simple", "IS": "9.46 ± 0.11", "FID": 3.17,
     "NLL bits/dim test (train)": "≤ 3.75 (3.72)"},
]

# DDPM Table 2 (IS / FID): parameterisation -> objective -> value
TABLE2 = [
    {"parameterisation": "μ̃ prediction", "L, learned diagonal Σ": "7.28 / 23.69",
     "L, fixed isotropic Σ": "8.06 / 13.22", "unweighted MSE": "unstable"},
    {"parameterisation": "ε prediction", "L, learned diagonal Σ": "unstable",
     "L, fixed isotropic Σ": "7.67 / 13.51", "unweighted MSE": "9.46 / 3.17 (L_simple)"},
]

# DDIM (Song et al. 2021) Table 1, CIFAR-10 FID, quadratic spacing: steps -> FID
DDIM_ETA0 = {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04}
DDPM_RESPACED = {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17}
