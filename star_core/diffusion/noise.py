"""Noise samplers for the SDE solver: the official torchsde Brownian tree, or recorded noise injected in order."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


class BrownianTreeNoiseSampler:
    """Brownian-tree noise exactly as the official ``BatchedBrownianTree`` (single entropy, no batching).

    The tree spans ``[sigma_min, sigma_max]``; a call ``(sigma, sigma_next)`` queries the ascending interval, flips the
    sign when the sigmas decrease and normalises by ``sqrt(|sigma_next - sigma|)`` to give unit-variance noise.
    torchsde seeds its own generator on ``x``'s device, so the numbers are deterministic per device type.

    Parameters:
        x (`torch.Tensor`): tensor whose shape, dtype and device the noise takes.
        sigma_min (`torch.Tensor`): smallest non-zero solver sigma.
        sigma_max (`torch.Tensor`): largest finite solver sigma.
        entropy (`int`): tree seed (official run, seed 666 on CUDA: 3697412327659087747).
    """

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, entropy: int) -> None:
        if not isinstance(entropy, int) or not 0 <= entropy < 2**63:
            raise ValueError(f"Brownian entropy must be an int in [0, 2**63), got {entropy!r}")
        self._like = x
        self._lo, self._hi = sorted((torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)))
        self._entropy = entropy
        self._tree = None  # built on first use: a sampler that is never queried (one-step runs) needs no tree

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self._tree is None:
            import torchsde

            self._tree = torchsde.BrownianTree(self._lo, torch.zeros_like(self._like), self._hi, entropy=self._entropy)
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():
            # torchsde rounds the tree's start to its tolerance and warns (then clamps, as in the official run) when
            # the float32 sigma_min lies a rounding error below it.
            warnings.filterwarnings("ignore", message="Should have ta>=t0")
            w = self._tree(lo, hi)
        return w * sign / (t1 - t0).abs().sqrt()


class InjectedNoiseSampler:
    """Returns recorded noise tensors in call order (e.g. the fixtures' ``brownian_noise_stepNN``).

    Parameters:
        noises (`Sequence[torch.Tensor]`): one tensor per noisy solver step, shaped like the latent.
    """

    def __init__(self, noises: Sequence[torch.Tensor]) -> None:
        self._noises = list(noises)
        self._calls = 0

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self._calls >= len(self._noises):
            raise ValueError(f"brownian: {len(self._noises)} injected noise tensors given but the solver needs at "
                             f"least {self._calls + 1}; pass one tensor per noisy step (steps - 1) or an entropy int")
        noise = self._noises[self._calls]
        self._calls += 1
        return noise
