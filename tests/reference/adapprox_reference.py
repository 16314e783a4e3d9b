"""Adapprox's update rule with an exact dense second moment: slow, obvious, float64.

This is what Adapprox computes when its low-rank factors are exact (full rank), written
one line per line of the algorithm with no factorization, no reshaping and no in-place
tricks. Tests compare :class:`microadam.optim.adapprox.Adapprox` against it step by step.
"""

from __future__ import annotations

import math

import torch


class DenseAdapproxReference:
    """Adapprox's rule on a list of tensors, keeping ``V`` densely.

    Per tensor, per step (no bias correction)::

        V <- beta2 V + (1 - beta2) g^2
        u <- g / (sqrt(V) + eps)
        u <- u / max(1, RMS(u) / clip_threshold)       (skipped if clip_threshold is None)
        m <- beta1 m + (1 - beta1) u;  u <- m           (skipped if beta1 is None or 0)
        p <- p (1 - lr wd) - lr u
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float | None, float],
        eps: float,
        weight_decay: float,
        clip_threshold: float | None,
        maximize: bool = False,
    ) -> None:
        self.params = [p.detach().clone().to(torch.float64) for p in params]
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.clip_threshold = clip_threshold
        self.maximize = maximize
        self.second_moments = [torch.zeros_like(p) for p in self.params]
        self.first_moments = [torch.zeros_like(p) for p in self.params]

    def step(self, grads: list[torch.Tensor]) -> None:
        for i, grad in enumerate(grads):
            g = grad.to(torch.float64)
            if self.maximize:
                g = -g
            v = self.beta2 * self.second_moments[i] + (1 - self.beta2) * g * g
            self.second_moments[i] = v
            u = g / (torch.sqrt(v) + self.eps)
            if self.clip_threshold is not None:
                rms = math.sqrt(float((u * u).sum()) / max(u.numel(), 1))
                u = u / max(1.0, rms / self.clip_threshold)
            if self.beta1 is not None and self.beta1 > 0:
                m = self.beta1 * self.first_moments[i] + (1 - self.beta1) * u
                self.first_moments[i] = m
                u = m
            p = self.params[i]
            self.params[i] = p * (1 - self.lr * self.weight_decay) - self.lr * u
