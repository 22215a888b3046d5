"""Every random tensor of a run, from one user seed or injected explicitly.

Documented draw order (one dedicated CPU ``torch.Generator`` seeded with the user seed, never the global RNG):

1. VAE posterior noise, one ``randn([1,4,h,w])`` per frame, in frame order;
2. the start noise of ``diffuse``, ``[1,4,F,h,w]``, drawn into a tensor laid out ``[1,F,4,h,w]`` (the layout of
   the official ``randn_like`` on the rearranged VAE output, which takes a different CPU sampling path);
3. the Brownian-tree entropy, ``randint(0, 2**63 - 1)``.

This is the official CPU order after ``setup_seed(seed)``, so ``RunNoise(seed)`` on CPU reproduces an official CPU
run bit-exactly (official CUDA runs draw 1–2 on the CUDA generator: inject those tensors instead). Noise is always
drawn on CPU and then moved, so a seed gives the same video on every device.
"""
from __future__ import annotations

import torch

BROWNIAN_ENTROPY_HIGH = 2**63 - 1


class RunNoise:
    """
    The random inputs of one run.

    Parameters:
        seed (`int`, *optional*): the user seed; required for every stream that is not injected.
        posterior_eps (`torch.Tensor`, *optional*): recorded VAE posterior noise [F,4,h,w] (frame order).
        diffuse_eps (`torch.Tensor`, *optional*): recorded start noise [1,4,F,h,w].
        brownian (`int` or `list[torch.Tensor]`, *optional*): recorded Brownian-tree entropy, or the recorded
            per-step Brownian noises.

    Streams are consumed in the documented order. With a seed, every stage advances the generator even when its
    tensor is injected or skipped (asking for the start noise before every frame's posterior noise was drawn
    draws and discards the missing frames), so a seed always yields the same start noise and entropy — whether
    the LR latent was encoded with this object, another one, or with the posterior mean.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        posterior_eps: torch.Tensor | None = None,
        diffuse_eps: torch.Tensor | None = None,
        brownian: int | list[torch.Tensor] | None = None,
    ) -> None:
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
            self._generator: torch.Generator | None = torch.Generator("cpu").manual_seed(seed)
        else:
            self._generator = None
        if posterior_eps is not None and posterior_eps.ndim != 4:
            raise ValueError(f"posterior_eps must be [F,4,h,w], got shape {tuple(posterior_eps.shape)}")
        if diffuse_eps is not None and diffuse_eps.ndim != 5:
            raise ValueError(f"diffuse_eps must be [1,4,F,h,w], got shape {tuple(diffuse_eps.shape)}")
        self.seed = seed
        self._posterior_eps = posterior_eps
        self._diffuse_eps = diffuse_eps
        self._brownian = brownian
        self._frames_drawn = 0
        self._stage = 0  # 0: posterior, 1: diffuse drawn, 2: entropy drawn

    def _require(self, what: str, injected: object) -> None:
        if injected is None and self._generator is None:
            raise ValueError(f"RunNoise has no seed and no injected {what}: pass seed= or {what}=")

    def posterior_eps(self, frame: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """
        The posterior noise of frame `frame`, shape `shape` = (1, 4, h, w). Frames must be asked for in order
        (streaming encoders call this window by window).
        """
        if self._stage != 0 or frame != self._frames_drawn:
            raise ValueError(
                f"posterior noise requested for frame {frame}, expected frame {self._frames_drawn} "
                "(frames are drawn in order, before the start noise)"
            )
        self._require("posterior_eps", self._posterior_eps)
        self._frames_drawn += 1
        drawn = torch.randn(shape, generator=self._generator) if self._generator is not None else None
        if self._posterior_eps is not None:
            if frame >= self._posterior_eps.shape[0] or tuple(self._posterior_eps.shape[1:]) != tuple(shape[1:]):
                raise ValueError(
                    f"injected posterior_eps {tuple(self._posterior_eps.shape)} has no frame {frame} of shape {shape}"
                )
            return self._posterior_eps[frame:frame + 1].to(device)
        return drawn.to(device)

    def posterior_eps_window(
        self, start: int, count: int, shape: tuple[int, int, int], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Posterior noise of frames `start … start+count-1`, [count,4,h,w] (`shape` = (4, h, w))."""
        return torch.cat([self.posterior_eps(start + i, (1, *shape), device) for i in range(count)])

    def diffuse_eps(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The start noise for `diffuse`, shape (1, 4, F, h, w)."""
        if self._stage != 0:
            raise ValueError("the start noise was already drawn from this RunNoise; make a new one per run")
        if len(shape) != 5:
            raise ValueError(f"start noise shape must be (1,4,F,h,w), got {shape}")
        self._require("diffuse_eps", self._diffuse_eps)
        if self._generator is not None:  # keep the documented stream aligned when frames were skipped
            while self._frames_drawn < shape[2]:
                self.posterior_eps(self._frames_drawn, (1, shape[1], *shape[3:]))
        self._stage = 1
        drawn = None
        if self._generator is not None:
            b, c, f, h, w = shape
            drawn = torch.empty(b, f, c, h, w).permute(0, 2, 1, 3, 4).normal_(generator=self._generator)
        if self._diffuse_eps is not None:
            if tuple(self._diffuse_eps.shape) != tuple(shape):
                raise ValueError(
                    f"injected diffuse_eps {tuple(self._diffuse_eps.shape)} != latent shape {tuple(shape)}"
                )
            return self._diffuse_eps.to(device)
        return drawn.contiguous().to(device)

    def brownian(self) -> int | list[torch.Tensor]:
        """The Brownian-tree entropy (or the injected per-step noises); drawn after the start noise."""
        if self._stage != 1:
            raise ValueError("the Brownian entropy is drawn once, after the start noise (call diffuse_eps first)")
        self._require("brownian", self._brownian)
        self._stage = 2
        drawn = None
        if self._generator is not None:
            drawn = int(torch.randint(0, BROWNIAN_ENTROPY_HIGH, [], generator=self._generator).item())
        return self._brownian if self._brownian is not None else drawn
