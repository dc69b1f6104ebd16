"""The deterministic event loop: virtual time, a seeded scheduler, no real I/O.

:class:`SimulationLoop` is an asyncio event loop whose :meth:`~SimulationLoop.time` is virtual:
when no callback is ready it jumps straight to the next timer, so ``asyncio.sleep``,
``wait_for`` and every timeout run on simulated time and an hour passes in milliseconds.
The callbacks that are ready together run in an order chosen by a seeded RNG (exploring
interleavings, FoundationDB-style) while each task's own callbacks keep their FIFO order,
which is all asyncio promises. Real I/O, threads and subprocesses raise
:class:`~collaborative_blocks.errors.NondeterminismError`: a simulated run must be a pure
function of its inputs.

Tasks know which simulated system (node) created them (:data:`CURRENT_NODE`), so a node's
crash cancels exactly its tasks.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import random
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from collaborative_blocks.errors import NondeterminismError, SimulationError

__all__ = ["CURRENT_NODE", "SimClock", "SimulationLoop"]

T = TypeVar("T")

#: The simulated system whose code is running (None: the simulator or the network).
CURRENT_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cb_sim_node", default=None
)

_MAX_JUMP = 7 * 86_400.0


class _NoSelector:
    """Stands in for the selector: there is never any I/O to wait for."""

    def __init__(self, loop: SimulationLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        return []

    def close(self) -> None:
        pass

    def get_map(self) -> dict[Any, Any]:
        return {}


class _Handle(asyncio.Handle):
    """An asyncio handle built without the debug-mode check (a simulation never needs it)."""

    __slots__ = ()

    def __init__(
        self,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> None:
        _init_handle(self, callback, args, loop, context)


def _init_handle(
    handle: asyncio.Handle,
    callback: Callable[..., object],
    args: tuple[Any, ...],
    loop: asyncio.AbstractEventLoop,
    context: contextvars.Context,
) -> None:
    """What ``asyncio.Handle.__init__`` sets, minus its debug-mode check."""
    h: Any = handle
    h._callback = callback
    h._args = args
    h._loop = loop
    h._context = context
    h._cancelled = False
    h._repr = None
    h._source_traceback = None


class _TimerHandle(asyncio.TimerHandle):
    """A timer handle built without the debug-mode check."""

    __slots__ = ()

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> None:
        _init_handle(self, callback, args, loop, context)
        self._when = when
        self._scheduled = False


class SimulationLoop(asyncio.BaseEventLoop):
    """An asyncio loop on virtual time with a seeded order of ready callbacks.

    ``seed`` chooses the interleavings; ``shuffle=False`` keeps asyncio's FIFO order (only
    time is virtual). :attr:`steps` counts the callbacks run (a measure of work).
    """

    def __init__(self, seed: int = 0, *, shuffle: bool = True) -> None:
        super().__init__()
        self._now = 0.0
        self._rng = random.Random(f"cb-sim-loop:{seed}")
        self._shuffle = shuffle
        self._selector = _NoSelector(self)
        self.steps = 0
        self._node_tasks: dict[str, dict[int, asyncio.Task[Any]]] = {}
        self._task_seq = 0
        self._prune_at = 1024
        # Timers as (when, sequence, handle): the sequence breaks ties first come, first
        # served, and the heap compares floats and ints in C instead of calling
        # TimerHandle.__lt__ (BaseEventLoop's _scheduled stays empty).
        self._timers: list[tuple[float, int, Any]] = []
        self._timer_seq = 0
        self._cancelled_timers = 0

    # -- time ------------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    # -- scheduling callbacks ----------------------------------------------------------------
    # BaseEventLoop's versions, minus what a simulation never needs (thread and debug
    # checks): they run for nearly every callback of a run.

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        if self._closed:  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        if context is None:
            context = contextvars.copy_context()
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)  # type: ignore[attr-defined]
        return handle

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if self._closed:  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        if context is None:
            context = contextvars.copy_context()
        timer = _TimerHandle(when, callback, args, self, context)
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, timer))
        timer._scheduled = True
        return timer

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        if handle._scheduled:  # type: ignore[attr-defined]
            self._cancelled_timers += 1

    # -- tasks by node -----------------------------------------------------------------------

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T] | Generator[Any, None, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """A task, remembered under the node whose code created it (:data:`CURRENT_NODE`).

        (This loop ignores ``set_task_factory``: its tasks are always plain asyncio tasks.)
        """
        if self._closed:  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        task: asyncio.Task[T] = asyncio.Task(coro, loop=self, name=name, context=context)
        node = context.get(CURRENT_NODE) if context is not None else CURRENT_NODE.get()
        if node is not None:
            tasks = self._node_tasks.get(node)
            if tasks is None:
                tasks = self._node_tasks[node] = {}
            self._task_seq += 1
            tasks[self._task_seq] = task
            if len(tasks) > self._prune_at:
                # Finished tasks are dropped in bulk now and then (cheaper than a done
                # callback on every task).
                for seq in [seq for seq, t in tasks.items() if t.done()]:
                    del tasks[seq]
                self._prune_at = max(1024, 2 * len(tasks))
        return task

    def node_tasks(self, node: str) -> list[asyncio.Task[Any]]:
        """The unfinished tasks ``node`` created (directly or through its tasks), oldest first."""
        tasks = self._node_tasks.get(node, {})
        return [task for task in tasks.values() if not task.done()]

    # -- the scheduler -----------------------------------------------------------------------

    def _run_once(self) -> None:
        # BaseEventLoop's internals (_ready, _stopping, handles' fields) are what every
        # asyncio loop uses; typeshed does not declare them.
        base: Any = self
        timers = self._timers
        ready: deque[Any] = base._ready
        if self._cancelled_timers > 256 and 2 * self._cancelled_timers > len(timers):
            # Mostly cancelled timers (sleeps that were woken early): drop them in one go.
            # The heap's order is total on (when, sequence), so this changes nothing else.
            kept = [entry for entry in timers if not entry[2]._cancelled]
            for entry in timers:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
            heapq.heapify(kept)
            timers[:] = kept
            self._cancelled_timers = 0
        while timers and timers[0][2]._cancelled:
            heapq.heappop(timers)[2]._scheduled = False
            self._cancelled_timers -= 1
        if not ready and not base._stopping:
            if not timers:
                raise SimulationError(
                    "the simulation is deadlocked: no callback is ready and no timer is set "
                    "(every task waits for something that can never happen)"
                )
            when = timers[0][0]
            if when > self._now:
                # Nothing to do until the next timer: jump there.
                self._now = min(when, self._now + _MAX_JUMP)
        now = self._now
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            handle._scheduled = False
            ready.append(handle)
        count = len(ready)
        self.steps += count
        if count == 1:
            self._run_handle(ready.popleft())
            return
        if count > 1 and self._shuffle:
            batch = self._reorder(ready)
        else:
            batch = [ready.popleft() for _ in range(count)]
        for handle in batch:
            self._run_handle(handle)

    def _run_handle(self, handle: Any) -> None:
        """``handle._run()`` without its extra frame (this runs for every callback)."""
        if handle._cancelled:
            return
        try:
            handle._context.run(handle._callback, *handle._args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.call_exception_handler(
                {
                    "message": f"Exception in callback {handle._callback!r}",
                    "exception": exc,
                    "handle": handle,
                }
            )

    def _reorder(self, ready: deque[Any]) -> list[Any]:
        """Take every ready callback, the steps of different tasks in a seeded random order.

        A task has at most one callback ready at a time (its step, or the wake-up that runs
        its step), so permuting the tasks' callbacks among their positions keeps each task's
        own order. Callbacks that belong to no task (futures' done callbacks, ``call_soon``
        functions) keep their positions and FIFO order, since code may rely on that.
        """
        batch = list(ready)
        ready.clear()
        task_type = asyncio.Task
        positions = [
            i
            for i, handle in enumerate(batch)
            if type(getattr(handle._callback, "__self__", None)) is task_type
        ]
        n = len(positions)
        if n > 1:
            steps = [batch[i] for i in positions]
            # Fisher-Yates on random(): one C call per swap (random.shuffle's _randbelow is
            # Python code).
            rnd = self._rng.random
            for i in range(n - 1, 0, -1):
                j = int(rnd() * (i + 1))
                steps[i], steps[j] = steps[j], steps[i]
            for i, handle in zip(positions, steps, strict=True):
                batch[i] = handle
        return batch

    # -- refusing non-determinism ------------------------------------------------------------

    def _refuse(self, what: str) -> NondeterminismError:
        return NondeterminismError(
            f"{what} inside a simulated run: it would make the run depend on the real world. "
            "Use the simulated world's store and transport, and the node's clock and RNG, "
            "instead"
        )

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> Any:  # type: ignore[override]
        raise self._refuse(f"run_in_executor({getattr(func, '__name__', func)!r}) (a thread)")

    def _write_to_self(self) -> None:  # call_soon_threadsafe wakes the loop this way
        pass

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a DNS lookup")

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a network connection")

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a network server")

    async def create_datagram_endpoint(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a datagram endpoint")

    async def create_unix_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a unix socket connection")

    async def subprocess_exec(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a subprocess")

    async def subprocess_shell(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a subprocess")

    def add_reader(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise self._refuse("waiting on a file descriptor")

    def add_writer(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise self._refuse("waiting on a file descriptor")

    async def sock_connect(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a socket")

    async def sock_recv(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a socket")

    async def sock_sendall(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a socket")

    async def sock_accept(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a socket")

    async def sock_recv_into(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a socket")

    async def create_unix_server(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a unix socket server")

    async def connect_read_pipe(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a pipe")

    async def connect_write_pipe(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a pipe")

    async def sendfile(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("sending a file")

    def add_signal_handler(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise self._refuse("a signal handler")

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        return None


class SimClock:
    """A :class:`~collaborative_blocks.core.clock.Clock` on a :class:`SimulationLoop`.

    ``now()`` is ``start + loop time + skew`` (``skew``: this system's wall clock error),
    ``monotonic()`` the loop time, ``sleep()`` a timer on the loop.
    """

    __slots__ = ("_loop", "skew", "start")

    def __init__(self, loop: SimulationLoop, *, start: float, skew: float = 0.0) -> None:
        self._loop = loop
        self.start = start
        self.skew = skew

    def now(self) -> float:
        return self.start + self._loop._now + self.skew

    def monotonic(self) -> float:
        return self._loop._now

    def call_later(self, seconds: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        """Run ``callback`` after ``seconds`` of simulated time (a timer, no task): what the
        memory transport uses to wake its consumers at an ack deadline."""
        return self._loop.call_at(self._loop._now + max(seconds, 0.0), callback)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(loop._now + seconds, _wake, future)
        try:
            await future
        finally:
            handle.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
