"""``NoiseSchedule``: the float64 tables of a discrete DDPM forward process and the operations indexed by ``t``.

Build it from a config::

    target: ldm.diffusion.NoiseSchedule
    params: {kind: scaled_linear, num_timesteps: 1000}

Every method takes ``t`` as an integer tensor ``[B]`` (or 0-d) of DDPM timesteps in ``0 .. T-1`` and broadcasts
the gathered coefficient over the trailing dims of ``x [B, ...]``. Coefficients come from the float64 tables and
are cast to the dtype of ``x`` once, at the end (see :mod:`ldm.diffusion.gaussian`).

The tables are non-persistent float64 buffers: they follow ``.to(device)`` / ``.cuda()`` of an enclosing model but
not dtype casts (``.half()`` keeps them float64), and they do not appear in state dicts, since they are a function
of the constructor arguments.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import gaussian
from .gaussian import randn_like
from .schedules import make_beta_schedule, rescale_zero_terminal_snr as _rescale

# Zero terminal SNR makes abar_{T-1} = 0, where an eps prediction carries no information about x0 and
# x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero (and k-diffusion's sigma_max is infinite). We store
# a tiny positive abar_{T-1} instead, continuing the last ratio of the rescaled schedule geometrically:
# abar_{T-1} = abar_{T-2}^2 / abar_{T-3}, i.e. beta_{T-1} = beta_{T-2} (monotone by construction). For Stable Diffusion's scaled_linear schedule
# this is the constant ComfyUI / A1111 use, 4.8973451890853435e-08 (sigma_max ~ 4.5e3), to 3e-9 relative.
# The eps -> x0 conversion at t = T-1 still amplifies errors by 1 / sqrt(abar): use the v (or x0) parameterization.
ZERO_TERMINAL_SNR_ALPHA_CUMPROD = 4.8973451890853435e-08


def terminal_alpha_cumprod(alphas_cumprod: torch.Tensor) -> float:
    """The positive ``abar_{T-1}`` stored for a zero-terminal-SNR schedule: ``abar_{T-2}^2 / abar_{T-3}``."""
    if alphas_cumprod.numel() < 3:
        raise ValueError("a zero-terminal-SNR schedule needs num_timesteps >= 3")
    return float(alphas_cumprod[-2] ** 2 / alphas_cumprod[-3])


TimestepLike = Union[torch.Tensor, int, Sequence[int]]


class NoiseSchedule(nn.Module):
    """Tables of a discrete forward process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``.

    Args:
        kind: ``linear``, ``scaled_linear`` or ``cosine`` (see :mod:`ldm.diffusion.schedules`).
        num_timesteps: ``T``.
        beta_start, beta_end: endpoints for linear / scaled_linear (per-kind defaults when None).
        rescale_zero_terminal_snr: rescale to ``abar_{T-1} = 0`` (Lin et al. 2024), then store the tiny
            :func:`terminal_alpha_cumprod` as ``abar_{T-1}`` (``betas[-1]`` adjusted so that
            ``alphas_cumprod == cumprod(1 - betas)`` still holds); ~4.9e-8 for scaled_linear.
        betas: explicit betas ``[T]`` (e.g. read from a checkpoint); then ``kind``, ``num_timesteps``,
            ``beta_start`` and ``beta_end`` are not used.

    Float64 buffers, all ``[T]``: ``betas``, ``alphas``, ``alphas_cumprod`` (abar_t), ``alphas_cumprod_prev``
    (abar_{t-1}, 1 at t=0), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``posterior_variance``
    (beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)), ``posterior_log_variance_clipped`` (log beta~_t with
    beta~_0 = 0 replaced by beta~_1, as in DDPM's code), ``posterior_mean_coef1``
    (sqrt(abar_{t-1}) beta_t / (1 - abar_t)), ``posterior_mean_coef2`` (sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)).
    """

    TABLES = (
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )

    def __init__(
        self,
        kind: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: Optional[float] = None,
        beta_end: Optional[float] = None,
        rescale_zero_terminal_snr: bool = False,
        betas: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if betas is None:
            betas = make_beta_schedule(kind, num_timesteps, beta_start, beta_end)
        else:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
            if betas.ndim != 1 or betas.numel() < 2:
                raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
            kind = "custom"
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas[:-1] >= 1).any() or betas[-1] > 1:
            raise ValueError("betas must lie in (0, 1) (the last one may be 1: zero terminal SNR)")
        if rescale_zero_terminal_snr:
            betas = _rescale(betas)
        self.kind = kind
        self.rescale_zero_terminal_snr = bool(rescale_zero_terminal_snr)

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        if alphas_cumprod[-1] <= 0:
            alphas_cumprod[-1] = terminal_alpha_cumprod(alphas_cumprod)
            alphas[-1] = alphas_cumprod[-1] / alphas_cumprod[-2]
            betas = betas.clone()
            betas[-1] = 1.0 - alphas[-1]
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name in self.TABLES:
            self.register_buffer(name, tables[name].contiguous(), persistent=False)

    # -- module plumbing -------------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts: the tables must stay float64.
        for name, buf in self._buffers.items():
            if buf is not None:
                device = fn(buf[:1]).device
                self._buffers[name] = buf.to(device=device, dtype=torch.float64)
        return self

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, num_timesteps={self.num_timesteps}, "
            f"rescale_zero_terminal_snr={self.rescale_zero_terminal_snr}"
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)``, float64 ``[T]``."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        """``lambda_t = log(abar_t / (1 - abar_t))``, float64 ``[T]``."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    # -- indexing ----------------------------------------------------------------------------------------------------

    def check_timesteps(self, t: TimestepLike, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` as an int64 tensor (0-d or ``[B]``), checked: integer, in ``0 .. T-1``, batch matching ``x``."""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer DDPM timesteps (a LongTensor), got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"t must be 0-d or 1-D [B], got shape {tuple(t.shape)}")
        if x is not None and t.ndim == 1:
            if x.ndim == 0 or t.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"t of shape {tuple(t.shape)} does not match a batch of shape {tuple(x.shape)}")
        if t.numel() > 0:
            t_min, t_max = int(t.min()), int(t.max())
            if t_min < 0 or t_max >= self.num_timesteps:
                raise ValueError(
                    f"timesteps must lie in 0..{self.num_timesteps - 1}, got values in {t_min}..{t_max}"
                )
        return t.long()

    def gather(self, name: str, t: TimestepLike, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float64 ``table[t]`` (shape of ``t``) of the table ``name``, on the device of ``t``."""
        if name not in self.TABLES:
            raise ValueError(f"unknown table {name!r}; valid: {', '.join(self.TABLES)}")
        t = self.check_timesteps(t, x)
        table = getattr(self, name)
        return table[t.to(table.device)].to(t.device)

    def _abar(self, t: TimestepLike, x: torch.Tensor) -> torch.Tensor:
        return self.gather("alphas_cumprod", t, x)

    # -- forward process ---------------------------------------------------------------------------------------------

    def q_sample(
        self,
        x0: torch.Tensor,
        t: TimestepLike,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; x0, noise ``[B, ...]``, t ``[B]``.

        ``noise`` defaults to a standard normal draw (from ``generator`` when given).
        """
        if noise is None:
            noise = randn_like(x0, generator)
        return gaussian.q_sample(x0, noise, self._abar(t, x0))

    def q_mean_variance(self, x0: torch.Tensor, t: TimestepLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean ``sqrt(abar_t) x0`` ``[B, ...]`` and variance ``1 - abar_t`` ``[B, 1, ...]`` of ``q(x_t | x0)``."""
        a = gaussian.as_coefficient(self._abar(t, x0), x0)
        return gaussian.cast_like(a.sqrt(), x0) * x0, gaussian.cast_like(1 - a, x0)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: TimestepLike
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q(x_{t-1} | x_t, x0) = N(coef1_t x0 + coef2_t x_t, beta~_t)`` (DDPM eq. 6-7).

        Returns ``(mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...])``; ``log_variance`` is the
        clipped table (``log beta~_1`` at t = 0, where ``beta~_0 = 0``), as in DDPM's code.
        """
        gaussian._check_broadcast(x0, x_t)
        coef = {
            name: gaussian.cast_like(gaussian.as_coefficient(self.gather(name, t, x_t), x_t), x_t)
            for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
                         "posterior_log_variance_clipped")
        }
        mean = coef["posterior_mean_coef1"] * x0 + coef["posterior_mean_coef2"] * x_t
        return mean, coef["posterior_variance"], coef["posterior_log_variance_clipped"]

    # -- parameterizations -------------------------------------------------------------------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: TimestepLike, eps: torch.Tensor) -> torch.Tensor:
        """``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return gaussian.predict_x0_from_eps(x_t, eps, self._abar(t, x_t))

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: TimestepLike, x0: torch.Tensor) -> torch.Tensor:
        """``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        return gaussian.predict_eps_from_x0(x_t, x0, self._abar(t, x_t))

    def predict_x0_from_v(self, x_t: torch.Tensor, t: TimestepLike, v: torch.Tensor) -> torch.Tensor:
        """``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
        return gaussian.predict_x0_from_v(x_t, v, self._abar(t, x_t))

    def predict_eps_from_v(self, x_t: torch.Tensor, t: TimestepLike, v: torch.Tensor) -> torch.Tensor:
        """``eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v``."""
        return gaussian.predict_eps_from_v(x_t, v, self._abar(t, x_t))

    def get_v(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``."""
        return gaussian.get_v(x0, noise, self._abar(t, x0))

    def model_output_to_x0_eps(
        self, output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike, parameterization: str = "eps"
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(pred_x0, pred_eps)`` from a model output of ``parameterization`` in {eps, x0, v}."""
        return gaussian.model_output_to_x0_eps(output, x_t, self._abar(t, x_t), parameterization)

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike, parameterization: str = "eps"
    ) -> torch.Tensor:
        """Regression target of ``parameterization``: ``noise``, ``x0`` or ``v``."""
        return gaussian.training_target(x0, noise, self._abar(t, x0), parameterization)

    def snr(self, t: TimestepLike) -> torch.Tensor:
        """``SNR_t = abar_t / (1 - abar_t)``, float64 with the shape of ``t``."""
        a = self.gather("alphas_cumprod", t)
        return a / (1.0 - a)

