"""The coefficient of the KL penalty to the reference: fixed, or adapted toward a target KL
(Ziegler et al., 2019): e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e * n_steps / horizon."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KLController:
    coef: float
    target: float | None = None  # None: a fixed coefficient
    horizon: float = 10000.0

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef
