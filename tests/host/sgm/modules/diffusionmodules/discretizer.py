"""sgm's LegacyDDPMDiscretization: betas linear in sqrt space from 0.00085 to 0.012 over 1000
steps (float64), alphas_cumprod their cumulative product of 1 - beta."""

from __future__ import annotations

import numpy as np


class LegacyDDPMDiscretization:
    def __init__(self, linear_start=0.00085, linear_end=0.012, num_timesteps=1000):
        self.num_timesteps = num_timesteps
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
