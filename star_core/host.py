"""What a host (the CLI, ComfyUI, a test, a benchmark) gives a run: one object instead of globals and copies.

Every stage of :mod:`star_core.pipeline` receives a :class:`HostContext` and talks to the host only through it:
structured progress events, the interrupt check before every model evaluation and every VAE tile, the layer
``operations`` and attention implementation for the network, devices, dtypes and the memory budget.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from .model.attention import AttentionFunction, use_attention

if TYPE_CHECKING:
    from .distributed import Distributed

LOG = logging.getLogger("star_core")

STAGES = ("encode", "sample", "decode")


@dataclass(frozen=True)
class ProgressEvent:
    """
    One progress report of a run.

    Parameters:
        stage (`str`): ``"encode"`` (VAE tiles of the LR frames), ``"sample"`` (model evaluations) or ``"decode"``
            (VAE tiles of the output frames).
        done (`int`), total (`int`): units of work finished and in the stage (evaluations, tiles).
        step (`int`, *optional*): sampler only: solver steps finished (``steps`` in all).
        steps (`int`, *optional*): sampler only: solver steps of the run.
        x0 (`torch.Tensor`, *optional*): sampler only, once per finished step: the current x0 prediction
            ``[1,4,F,h,w]`` (for previews); None on every other event.
    """

    stage: str
    done: int
    total: int
    step: int | None = None
    steps: int | None = None
    x0: torch.Tensor | None = None


ProgressFunction = Callable[[ProgressEvent], None]


@dataclass
class HostContext:
    """
    The host's side of a run.

    Parameters:
        device (`torch.device`): where the UNet samples (the latent lives there during sampling).
        progress (`Callable[[ProgressEvent], None]`, *optional*): receives every progress event.
        interrupt (`Callable[[], None]`, *optional*): raises (any exception) to cancel; called before every model
            evaluation and every VAE tile.
        operations (`module`, *optional*): layer namespace the network is built with (e.g. ComfyUI's cast layers).
        attention (`Callable`, *optional*): attention implementation ``(q, k, v, heads) -> out`` for the run.
        memory_budget (`int`, *optional*): bytes of device memory the run may use, its models' weights included
            (None: unknown; ``auto`` options then take their official values), see `star_core.autosize`.
        resident (`bool`): the run's models stay on the device for the whole run (the CLI); False for a host that
            loads each stage's model in turn (ComfyUI's model management).
        log (`Callable[[str], None]`): one-line messages for the user (default: the ``star_core`` logger).
        oom_errors (`tuple[type, ...]`): exception types that mean "out of memory" on this host.
        distributed (`Distributed`, *optional*): this process's rank when several processes share the run
            (``torchrun``; see :mod:`star_core.distributed`); None: one process does everything.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: ProgressFunction | None = None
    interrupt: Callable[[], None] | None = None
    operations: ModuleType | None = None
    attention: AttentionFunction | None = None
    memory_budget: int | None = None
    resident: bool = True
    log: Callable[[str], None] = LOG.info
    oom_errors: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
    distributed: Distributed | None = None

    @property
    def shared(self) -> Distributed | None:
        """The :class:`~star_core.distributed.Distributed` of a run shared by several ranks, else None."""
        return self.distributed if self.distributed is not None and self.distributed.active else None

    def check_interrupt(self) -> None:
        """Raises the host's cancel exception when the user asked to stop."""
        if self.interrupt is not None:
            self.interrupt()

    def report(self, stage: str, done: int, total: int, **details) -> None:
        """Sends a :class:`ProgressEvent` to the host (a no-op without a progress function)."""
        if self.progress is not None:
            self.progress(ProgressEvent(stage, done, total, **details))

    def tile_callback(self, stage: str, first: int = 0, count: int = 1, items: int = 1) -> Callable[[int, int], None]:
        """
        A low-level ``callback(done, total)`` for a VAE call over items ``first … first+count-1`` of ``items``
        (frames or windows, each with the same number of tiles) that checks for an interrupt and reports the
        stage's tiles done so far.
        """

        def on_tile(done: int, total: int) -> None:
            self.check_interrupt()
            per_item = max(1, total // count)
            self.report(stage, first * per_item + done, items * per_item)

        return on_tile

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The context a run executes in: the host's attention implementation, without autograd."""
        with use_attention(self.attention), torch.no_grad():
            yield
