"""The encoder's posterior q(z|x): a diagonal Gaussian over the latent grid."""

from __future__ import annotations

import math

import torch


class DiagonalGaussianDistribution:
    """``N(mean, diag(exp(logvar)))`` from encoder moments ``[B, 2C, h, w]`` split along channels into mean, logvar.

    ``logvar`` is clamped to [-30, 20] (as in SD) so ``exp`` stays finite. With ``deterministic=True`` the
    variance is zero: ``sample()`` returns the mean and ``kl``/``nll`` are zero.
    Reductions (``kl``, ``nll``) sum over every non-batch dimension and return shape ``[B]``.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"expected moments [B, 2*C, ...] with an even channel count, got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def _sum_dims(self) -> list[int]:
        return list(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draw ``z = mean + std * eps``, ``eps ~ N(0, I)``; differentiable in mean and logvar."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) in closed form, summed over non-batch dims -> ``[B]``; ``other=None`` means N(0, I).

        ``KL = 0.5 * sum( (mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2 )``; for N(0, I):
        ``0.5 * sum(mu^2 + var - 1 - logvar)``.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * torch.sum(terms, dim=self._sum_dims())

    def nll(self, sample: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
        """Negative log-density of ``sample``: ``0.5 * sum(log(2 pi) + logvar + (x - mu)^2 / var)`` over ``dims``."""
        dims = self._sum_dims() if dims is None else dims
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )
