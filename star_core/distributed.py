"""Several processes (GPUs, machines) on one run with ``torch.distributed``: exact work sharing and fault handling.

A run started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the
environment) gets one :class:`Distributed` per process (:meth:`Distributed.from_env`; NCCL on GPUs, Gloo on
CPUs); without those variables it is the single process and nothing changes. The pipeline receives it through
:attr:`star_core.host.HostContext.distributed` and shares three kinds of work items:

* the sampler's windows (temporal chunks × spatial tiles, and the CFG passes when that balances better) at every
  model evaluation — every rank gets every window's prediction and blends them in plan order with the same
  operations as one process, so every rank holds the same latent and the result is bit-identical;
* the VAE encoder's frame windows — gathered on every rank (the latent is small);
* the VAE decoder's temporal windows — gathered round by round on rank 0, which alone colour-fixes and writes.

Work items are owned round robin (:meth:`Distributed.owner`: item ``k`` on rank ``k mod world``, or whole windows
for the sampler); :meth:`Distributed.exchange` and :meth:`Distributed.stream` move the items' tensors. Faults: every collective is waited for in a loop that watches the other ranks through
the launcher's key-value store (a heartbeat per rank, the collective each rank reached, failures posted by
ranks that raised), so a rank that fails, dies or hangs ends the run on every rank with an error naming it —
a failure posted or a dead peer within :data:`DEAD_AFTER_S` seconds, a hang within the timeout (default
:data:`DEFAULT_TIMEOUT_S`). ``SIGTERM`` (what ``torchrun`` sends the survivors when a worker dies) becomes a
:class:`DistributedError` as well, so sinks abort and no partial output is left.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

DEFAULT_TIMEOUT_S = 600.0
HEARTBEAT_S = 1.0
# A peer whose heartbeat has not moved for this long while we wait for it is taken as dead.
DEAD_AFTER_S = 10.0
# After a collective failed or the launcher stopped us, how long to watch the heartbeats to name a dead peer.
DIAGNOSE_S = 3.5
POLL_S = 0.0005
CHECK_S = 0.5


class DistributedError(RuntimeError):
    """Another rank failed, died or hangs (the message names it), or the launcher stopped this rank."""


class _Watch:
    """The ranks' shared bulletin board in the launcher's store: heartbeats, positions, failures.

    Keys (under a per-run prefix): ``beat/<rank>`` counters, ``at/<rank>`` = ``"<collective number>|<what>"``,
    ``failed/<rank>`` = a one-line reason and ``failures`` (their count), ``stopped/<rank>`` for ranks that stop
    because of another one.
    """

    def __init__(self, rank: int, world_size: int, timeout: float) -> None:
        import torch.distributed as dist

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        prefix = f"star_core/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
                 f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        wait = datetime.timedelta(seconds=min(timeout, 30.0))

        def client():
            return dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False, timeout=wait))

        self.rank, self.world_size, self.address = rank, world_size, f"{host}:{port}"
        self.store, self._beat_store = client(), client()
        self.store.set(f"at/{rank}", "0|start")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="star-heartbeat", daemon=True)
        self._thread.start()
        self._seen: dict[int, tuple[int, float]] = {}

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a vanished store is diagnosed by the main thread
                self._beat_store.add(f"beat/{self.rank}", 1)
            self._stop.wait(HEARTBEAT_S)

    def close(self) -> None:
        self._stop.set()

    def others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def mark(self, number: int, what: str) -> None:
        self.store.set(f"at/{self.rank}", f"{number}|{what}")

    def post(self, reason: str, *, root: bool) -> None:
        """Tells the other ranks why this one stops (``root``: its own failure, else a consequence)."""
        with contextlib.suppress(Exception):
            self.store.set(f"{'failed' if root else 'stopped'}/{self.rank}", reason.replace("\n", " ")[:500])
            if root:
                self.store.add("failures", 1)

    def _has(self, key: str) -> bool:
        return self.store.check([key])

    def posted_failures(self) -> list[str]:
        """``"rank R failed: reason"`` for every other rank that posted its own failure."""
        if self.store.add("failures", 0) == 0:
            return []
        return [f"rank {r} failed: {self.store.get(f'failed/{r}').decode()}" for r in self.others()
                if self._has(f"failed/{r}")]

    def stopped(self) -> list[str]:
        """``"rank R stopped: reason"`` for every other rank that stopped because of another one."""
        return [f"rank {r} stopped: {self.store.get(f'stopped/{r}').decode()}" for r in self.others()
                if self._has(f"stopped/{r}")]

    def silent_ranks(self, after: float) -> list[int]:
        """Other ranks whose heartbeat has not moved for ``after`` seconds of watching (and that posted nothing)."""
        now, silent = time.monotonic(), []
        for r in self.others():
            beats = self.store.add(f"beat/{r}", 0)
            last = self._seen.get(r)
            if last is None or last[0] != beats:
                self._seen[r] = (beats, now)
            elif now - last[1] >= after and not self._has(f"stopped/{r}") and not self._has(f"failed/{r}"):
                silent.append(r)
        return silent

    def behind(self, number: int) -> list[tuple[int, str]]:
        """Other ranks that have not reached collective ``number``, with where they are."""
        late = []
        for r in self.others():
            if not self._has(f"at/{r}"):
                late.append((r, "start-up"))
                continue
            reached, _, what = self.store.get(f"at/{r}").decode().partition("|")
            if int(reached) < number:
                late.append((r, what))
        return late


class Distributed:
    """
    This process's place in a run: its rank among ``world_size`` processes, or the single process.

    Parameters:
        rank (`int`), world_size (`int`), local_rank (`int`): as set by ``torchrun``.
        device (`torch.device`): where this rank computes; NCCL collectives move tensors there, Gloo through the CPU.
        timeout (`float`): seconds a collective may wait for the slowest rank before the run is ended as hung.

    Attributes:
        traffic (`dict[str, int]`): bytes this rank received from the others per stage (``"sample"``,
            ``"encode"``, ``"decode"``), padding included.
        sent (`dict[str, int]`): bytes this rank contributed per stage.
        waited (`dict[str, float]`): seconds this rank spent in collectives per stage (the transfer, and waiting
            for slower ranks).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *,
                 device: torch.device | str = "cpu", timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.traffic: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.waited: dict[str, float] = {}
        self._collectives = 0
        self._watch: _Watch | None = None

    # --------------------------------------------------------------------------------------------- set-up

    @staticmethod
    def launched() -> bool:
        """True when this process was started by ``torchrun`` (or an equivalent) with more than one rank."""
        return int(os.environ.get("WORLD_SIZE", "1")) > 1

    @classmethod
    def from_env(cls, device: torch.device | str = "cpu", *, timeout: float = DEFAULT_TIMEOUT_S) -> Distributed:
        """
        Joins the run described by the environment (``torchrun``) and returns this rank; the single process when
        ``WORLD_SIZE`` is absent or 1.

        Parameters:
            device (`torch.device`): ``"cuda"`` (any index) puts this rank on ``cuda:LOCAL_RANK`` with NCCL;
                ``"cpu"`` uses Gloo.
            timeout (`float`): seconds before a rank that does not reach a collective ends the run.
        """
        if not cls.launched():
            return cls(device=device, timeout=timeout)
        import torch.distributed as dist

        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {name} is not: start the run with torchrun "
                                 "(torchrun --nproc-per-node N -m star_core upscale ...)")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device(device)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                                 "start at most one rank per GPU (--nproc-per-node)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        work = cls(rank, world, local_rank, device=device, timeout=timeout)
        # torch's own timeout is a backstop after ours (ours names the rank)
        dist.init_process_group(work.backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout + 60))
        work._watch = _Watch(rank, world, timeout)
        return work

    @property
    def active(self) -> bool:
        """More than one rank shares the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports progress and writes outputs."""
        return self.rank == 0

    def close(self) -> None:
        """Leaves the run after a clean finish (destroys the process group)."""
        if self._watch is not None:
            import torch.distributed as dist

            self._watch.close()
            self._watch = None
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------ work items

    def owner(self, item: int) -> int:
        """The rank that computes item ``item`` (round robin)."""
        return item % self.world_size

    def split_passes(self, windows: int, passes: int) -> bool:
        """Whether the sampler should share out the CFG passes of a window separately: only when that lowers the
        largest share of network calls (e.g. one window on two ranks), since it doubles the bytes exchanged."""
        if passes == 1 or not self.active:
            return False
        by_window = -(-windows // self.world_size) * passes
        by_pass = -(-(windows * passes) // self.world_size)
        return by_pass < by_window

    def exchange(self, outputs: Mapping[int, torch.Tensor], shapes: Sequence[Sequence[int]],
                 owners: Sequence[int] | None = None, *, stage: str, what: str, to: int | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> list[torch.Tensor] | None:
        """
        Every item's tensor from the rank that owns it: ``to=None`` gives all of them to every rank (all-gather),
        ``to=r`` only to rank ``r`` (the others get None).

        Parameters:
            outputs (`Mapping[int, torch.Tensor]`): this rank's items (exactly those ``owners`` gives it).
            shapes (`Sequence[Sequence[int]]`): every item's shape (all ranks know them from the plan).
            owners (`Sequence[int]`, *optional*): the rank of every item (default :meth:`owner`, round robin).
            stage (`str`): the traffic counter to add to.
            what (`str`): what is exchanged, for error messages (e.g. ``"sampler evaluation 3"``).
            to (`int`, *optional*): the only receiving rank.
            dtype (`torch.dtype`): the items' dtype.
            device (`torch.device`, *optional*): where the returned tensors go (default: this rank's device).

        Returns:
            `list[torch.Tensor] | None`: one tensor per item, in item order (this rank's own items are the given
            tensors, moved and cast like the others).
        """
        count = len(shapes)
        device = self.device if device is None else torch.device(device)
        owners = [self.owner(k) for k in range(count)] if owners is None else list(owners)
        held = [[k for k in range(count) if owners[k] == r] for r in range(self.world_size)]
        if sorted(outputs) != held[self.rank]:
            raise ValueError(f"exchange: rank {self.rank} must give items {held[self.rank]}, got {sorted(outputs)}")
        if not self.active:
            return [outputs[k].to(device, dtype) for k in range(count)]
        import torch.distributed as dist

        sizes = [math.prod(shape) for shape in shapes]
        shares = [sum(sizes[k] for k in items) for items in held]
        width = max(1, max(shares))
        carrier = self.device if self.backend == "nccl" else torch.device("cpu")
        buffer = torch.zeros(width, dtype=dtype, device=carrier)
        if shares[self.rank]:
            buffer[:shares[self.rank]] = torch.cat([outputs[k].reshape(-1).to(carrier, dtype)
                                                    for k in held[self.rank]])
        receiving = to is None or to == self.rank
        parts = [torch.empty_like(buffer) for _ in range(self.world_size)] if receiving else None
        self._mark(what)
        started = time.perf_counter()
        if to is None:
            work = dist.all_gather(parts, buffer, async_op=True)
        else:
            work = dist.gather(buffer, parts, dst=to, async_op=True)
        self._wait(work, what)
        self.waited[stage] = self.waited.get(stage, 0.0) + time.perf_counter() - started
        element = buffer.element_size()
        self.sent[stage] = self.sent.get(stage, 0) + (width * element if to != self.rank else 0)
        if not receiving:
            return None
        self.traffic[stage] = self.traffic.get(stage, 0) + (self.world_size - 1) * width * element
        result: list[torch.Tensor | None] = [None] * count
        for r, part in enumerate(parts):
            offset = 0
            for k in held[r]:
                result[k] = outputs[k].to(device, dtype) if r == self.rank else \
                    part[offset:offset + sizes[k]].view(*shapes[k]).to(device)
                offset += sizes[k]
        return result

    def stream(self, count: int, compute: Callable[[int], torch.Tensor], shape: Callable[[int], Sequence[int]], *,
               stage: str, what: str, to: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """
        Items ``0 … count-1`` computed by their owners and delivered to rank ``to`` in order, one round (one item
        per rank) at a time, so rank ``to`` never holds more than ``world`` items; the other ranks' iterators
        yield nothing (iterate them to the end all the same: that is when they compute and send).

        Parameters:
            count (`int`): number of items.
            compute (`Callable[[int], torch.Tensor]`): item index → its tensor (called on the owner only).
            shape (`Callable[[int], Sequence[int]]`): item index → its shape (known on every rank).
            stage (`str`), what (`str`), to (`int`), dtype (`torch.dtype`), device (`torch.device`): as in
                :meth:`exchange` (``what`` is followed by the round's first item number).
        """
        for first in range(0, count, self.world_size):
            last = min(first + self.world_size, count)
            mine = first + self.rank
            outputs = {self.rank: compute(mine)} if mine < last else {}
            received = self.exchange(outputs, [shape(k) for k in range(first, last)], stage=stage,
                                     what=f"{what} {first + 1}{'' if last == first + 1 else f'-{last}'} of {count}", to=to, dtype=dtype, device=device)
            del outputs
            if received is not None:
                yield from received

    def broadcast(self, value: object, *, what: str) -> object:
        """Rank 0's ``value`` (any picklable object; the others pass anything) on every rank, waited for like
        every collective (a rank that fails or dies meanwhile ends the run, named)."""
        if not self.active:
            return value
        import pickle

        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8) if self.is_main else None
        length = self.exchange({0: torch.tensor([len(payload)], dtype=torch.int64)} if self.is_main else {},
                               [(1,)], [0], stage="control", what=what, dtype=torch.int64, device="cpu")[0]
        data = self.exchange({0: payload} if self.is_main else {}, [(int(length),)], [0], stage="control",
                             what=what, dtype=torch.uint8, device="cpu")[0]
        return value if self.is_main else pickle.loads(data.numpy().tobytes())

    def flagged(self, flag: bool, *, what: str) -> list[int]:
        """The ranks whose ``flag`` is true (every rank passes its own; e.g. "my part ran out of memory")."""
        if not self.active:
            return [0] if flag else []
        flags = self.exchange({self.rank: torch.tensor([int(flag)], dtype=torch.uint8)}, [(1,)] * self.world_size,
                              list(range(self.world_size)), stage="control", what=what, dtype=torch.uint8,
                              device="cpu")
        return [r for r, value in enumerate(flags) if int(value)]

    def finish(self, failures: int) -> int:
        """
        Waits until every rank has finished its own work (however long that takes: a rank that fails or dies
        meanwhile still ends the run) and returns the failures of all ranks together, so that every rank exits with
        the same status and none is stopped by the launcher while another still works.

        Parameters:
            failures (`int`): this rank's failed items (e.g. videos that could not be read).
        """
        if self._watch is None:
            return failures
        store = self._watch.store
        store.add("finish/failures", failures)
        store.add("finish/ranks", 1)
        self._mark("the end of the batch")
        while store.add("finish/ranks", 0) < self.world_size:
            try:
                failed = self._watch.posted_failures()
                silent = self._watch.silent_ranks(DEAD_AFTER_S)
            except DistributedError:
                raise
            except Exception as exc:
                raise DistributedError(self._prefix("the end of the batch") + self._store_gone(exc)) from None
            if failed or silent:
                problem = "; ".join(failed) if failed else self._silent(silent, DEAD_AFTER_S)
                raise DistributedError(self._prefix("the end of the batch") + problem)
            time.sleep(CHECK_S)
        return int(store.add("finish/failures", 0))

    # --------------------------------------------------------------------------------------------- faults

    def _mark(self, what: str) -> None:
        self._collectives += 1
        if self._watch is not None:
            self._watch.mark(self._collectives, what)

    def _wait(self, work, what: str) -> None:
        """Waits for a collective while watching the other ranks; raises :class:`DistributedError` naming the rank
        that failed, died or hangs."""
        started = time.monotonic()
        next_check = started + CHECK_S
        while not work.is_completed():
            now = time.monotonic()
            if now >= next_check and self._watch is not None:
                next_check = now + CHECK_S
                try:
                    failed = self._watch.posted_failures()
                    silent = self._watch.silent_ranks(DEAD_AFTER_S)
                except DistributedError:  # SIGTERM arrived meanwhile
                    raise
                except Exception as exc:  # the store went away with its host
                    raise DistributedError(self._prefix(what) + self._store_gone(exc)) from None
                if failed:
                    raise DistributedError(self._prefix(what) + "; ".join(failed))
                if silent:
                    raise DistributedError(self._prefix(what) + self._silent(silent, DEAD_AFTER_S))
            if now - started > self.timeout:
                raise DistributedError(self._prefix(what) + self.diagnose(hung=True))
            time.sleep(POLL_S)
        try:
            work.wait()
        except Exception as exc:
            raise DistributedError(self._prefix(what) + self.diagnose(cause=exc)) from None

    def _prefix(self, what: str) -> str:
        return f"rank {self.rank} stopped at {what}: "

    def _store_gone(self, exc: BaseException) -> str:
        address = self._watch.address if self._watch is not None else "?"
        return (f"the launcher's store at {address} is unreachable ({type(exc).__name__}): rank 0 or the launcher "
                "on the first node is gone")

    @staticmethod
    def _silent(ranks: list[int], seconds: float) -> str:
        names = ", ".join(f"rank {r}" for r in ranks)
        return f"{names} stopped responding (no heartbeat for {seconds:.0f} s: killed, crashed or its machine is gone)"

    def diagnose(self, *, cause: BaseException | None = None, hung: bool = False) -> str:
        """Why the run cannot go on, naming the rank(s) responsible: posted failures first, then ranks whose
        heartbeat stopped (watched for up to :data:`DIAGNOSE_S` s), then ranks that never reached this rank's
        collective."""
        if self._watch is None:
            return str(cause) if cause is not None else "no other rank"
        try:
            deadline = time.monotonic() + (0 if hung else DIAGNOSE_S)
            while True:
                failed = self._watch.posted_failures()
                if failed:
                    return "; ".join(failed)
                silent = self._watch.silent_ranks(DIAGNOSE_S - 0.5)
                if silent:
                    return self._silent(silent, DIAGNOSE_S - 0.5)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.25)
            late = self._watch.behind(self._collectives)
            stopped = self._watch.stopped()
        except DistributedError:
            raise
        except Exception as exc:
            return self._store_gone(exc)
        if late:
            where = ", ".join(f"rank {r} (still at {at})" for r, at in late)
            return f"{where} did not get there within {self.timeout:.0f} s: it hangs"
        if stopped:
            return "; ".join(stopped)
        if hung:
            return f"the collective did not complete within {self.timeout:.0f} s"
        detail = f" ({str(cause).splitlines()[0][:200]})" if cause is not None else ""
        return f"another rank stopped{detail}"

    def post_failure(self, reason: str, *, root: bool = True) -> None:
        """Tells the other ranks this one stops: ``root`` for its own error (they name it), else because of
        another rank."""
        if self._watch is not None:
            self._watch.post(reason, root=root)

    @contextlib.contextmanager
    def guard(self) -> Iterator[Distributed]:
        """
        The scope of a distributed run in a process: ``SIGTERM`` (the launcher stopping the survivors of a failed
        rank) raises :class:`DistributedError` naming the failed rank, an error of this rank is posted for the
        others before it propagates, and a clean exit closes the process group.
        """
        if not self.active:
            yield self
            return
        stopping = []

        def on_term(signum, frame):
            if stopping:
                return
            stopping.append(signum)
            raise DistributedError(f"rank {self.rank} was stopped by the launcher: {self.diagnose()}")

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            yield self
        except DistributedError as exc:
            self.post_failure(str(exc), root=False)
            raise
        except BaseException as exc:
            self.post_failure(f"{type(exc).__name__}: {exc}", root=True)
            raise
        else:
            self.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self._watch is not None:
                self._watch.close()


@dataclass(frozen=True)
class BatchPlan:
    """
    How a batch of videos is spread over the ranks.

    Parameters:
        shared (`tuple[int, ...]`): videos every rank works on together (chunk-parallel), in input order.
        own (`tuple[tuple[int, ...], ...]`): per rank, the whole videos it processes alone, in input order.
    """

    shared: tuple[int, ...]
    own: tuple[tuple[int, ...], ...]


def plan_batch(costs: Sequence[float], world_size: int) -> BatchPlan:
    """
    Spreads videos over ``world_size`` ranks without further communication: whole videos (largest first, each to
    the least loaded rank) for all but the ``len(costs) mod world_size`` largest, which the ranks share — so every
    video is processed exactly once and every rank is busy. One rank: everything is its own.

    Parameters:
        costs (`Sequence[float]`): work per video (e.g. frames × pixels), in input order.
        world_size (`int`): number of ranks.
    """
    count = len(costs)
    if world_size == 1:
        return BatchPlan((), (tuple(range(count)),))
    by_size = sorted(range(count), key=lambda i: (-costs[i], i))
    shared = by_size[:count % world_size]
    loads = [0.0] * world_size
    own: list[list[int]] = [[] for _ in range(world_size)]
    for video in by_size[count % world_size:]:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        own[rank].append(video)
        loads[rank] += costs[video]
    return BatchPlan(tuple(sorted(shared)), tuple(tuple(sorted(videos)) for videos in own))
