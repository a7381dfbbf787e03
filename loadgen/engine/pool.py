"""Many engine processes as one: ``ProcessPool`` drives ``python -m loadgen.engine.child``
processes over JSON lines on their stdin/stdout and merges their stats; ``InlinePool`` is one
engine in this process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from loadgen.engine.config import EngineConfig
from loadgen.engine.engine import Engine
from loadgen.engine.sources import Namespace, auto_procs, nofile_capacity
from loadgen.engine.stats import Stats
from service.jsonlines import Peer, PeerGone


def split_n(n: int, parts: int) -> list[int]:
    """Spread n over parts as evenly as possible."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Child:
    """One engine process and the :class:`Peer` on its stdin/stdout."""

    __slots__ = ("proc", "index", "peer", "reading", "last", "broken")

    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.index = index
        self.peer = Peer(proc.stdout, proc.stdin, name=f"client process {index} (pid {proc.pid})")
        self.reading = asyncio.get_running_loop().create_task(self.peer.run())
        self.last = Stats()  # its latest answer, kept if it dies
        self.broken = False

    async def stop(self) -> None:
        """Close its stdin (it drops its connections and exits); kill it if it lingers."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(5.0):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reading.cancel()  # done already (its stdout ended), or cut short now
        with contextlib.suppress(asyncio.CancelledError):
            await self.reading

    def gone(self, outcome: object) -> bool:
        """Whether a call's outcome (an answer or an exception) means this process is gone. A
        timeout while it still runs is slow, not gone: killing slow engines on a saturated
        one-box million dropped 21 × 19,600 connections and made the host busier still."""
        if isinstance(outcome, TimeoutError) and self.proc.returncode is None:
            return False
        return isinstance(outcome, BaseException)

    async def call(self, msg: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        try:
            return await self.peer.call(msg, timeout)
        except PeerGone as exc:
            raise RuntimeError(f"{exc} (exited)") from None


class ProcessPool:
    """Spreads an engine over child processes; same interface as a single engine.

    ``procs`` = None means auto: grow to ceil(n / capacity) processes whenever n rises.
    """

    def __init__(
        self,
        config: EngineConfig,
        source_ips: list[str],
        procs: int | None = None,
        capacity: int | None = None,
        namespaces: Sequence[Namespace] = (),
    ) -> None:
        self.config = config
        self.source_ips = source_ips
        # comet-bench --netns: engine i runs in namespace i mod len and connects from its
        # addresses (loadgen.bench.netns).
        self.namespaces = namespaces
        self.fixed = procs
        self.capacity = capacity if capacity is not None else nofile_capacity()
        self.children: list[_Child] = []
        self.retired = Stats()  # counters of engine processes that died and were replaced
        self.respawned = 0
        # How long an engine may take to answer before it counts as slow (not gone).
        self.call_timeout = 60.0
        self._lock = asyncio.Lock()

    @property
    def procs(self) -> int:
        return len(self.children)

    async def start(self) -> None:
        await self.apply(self.config)

    async def _spawn_one(self, i: int) -> _Child:
        sources = self.source_ips
        argv = [sys.executable, "-m", "loadgen.engine.child", "--child", "--index", str(i)]
        if self.namespaces:
            ns = self.namespaces[i % len(self.namespaces)]
            sources, argv = list(ns.addresses), ns.wrap(argv)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--source-ips",
            ",".join(sources) or "none",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        child = _Child(proc, i)
        hello = await child.call({"op": "stats"}, timeout=30.0)
        if not hello.get("ok"):
            raise RuntimeError(f"client process {i} did not start: {hello}")
        return child

    async def grow(self, count: int) -> None:
        """Start engine processes until there are ``count`` (idle until :meth:`apply`), all at
        once: one at a time, a step of the one-box million that needed five more took longer
        than a control client waits. If one fails to start, the others are stopped again."""
        first = len(self.children)
        if count <= first:
            return
        started = await asyncio.gather(
            *(self._spawn_one(i) for i in range(first, count)), return_exceptions=True
        )
        failure = next((r for r in started if isinstance(r, BaseException)), None)
        if failure is None:
            self.children.extend(r for r in started if isinstance(r, _Child))
            return
        for r in started:
            if isinstance(r, _Child):
                await r.stop()
        raise failure

    async def _heal(self) -> None:
        """Replace engine processes that died (OOM, kill): keep their counters, reconnect."""
        async with self._lock:
            shares = split_n(self.config.n, len(self.children)) if self.children else []
            for i, c in enumerate(self.children):
                if c.proc.returncode is None and not c.broken:
                    continue
                if c.proc.returncode is None:
                    c.proc.kill()
                    await c.proc.wait()
                gone = c.last
                gone.clients = gone.inproc = 0
                self.retired.merge(gone)
                self.respawned += 1
                fresh = await self._spawn_one(i)
                self.children[i] = fresh
                await fresh.call({"op": "set", **asdict(self.config), "n": shares[i]})

    async def _call_all(self, msg: dict[str, Any]) -> list[dict[str, Any] | None]:
        """``msg`` to every engine; one that is gone is replaced and asked again. One that is
        only slow (no answer within ``call_timeout``: a loaded host, tens of thousands of
        connections to serve) answers None and keeps its connections (:meth:`_Child.gone`)."""
        for attempt in (1, 2):
            results = await asyncio.gather(
                *(c.call(msg, self.call_timeout) for c in self.children),
                return_exceptions=True,
            )
            failed = False
            answers: list[dict[str, Any] | None] = []
            for c, r in zip(self.children, results, strict=True):
                if c.gone(r):
                    c.broken = True
                    failed = True
                else:
                    answers.append(None if isinstance(r, BaseException) else r)
            if not failed:
                return answers
            if attempt == 2:
                break
            await self._heal()
        raise RuntimeError("engine processes keep failing; see the agent's stderr")

    async def apply(self, config: EngineConfig) -> None:
        async with self._lock:
            self.config = config
            want = self.fixed if self.fixed else auto_procs(config.n, self.capacity)
            await self.grow(max(want, len(self.children)))
            shares = split_n(config.n, len(self.children))
            base = asdict(config)
            results = await asyncio.gather(
                *(
                    c.call({"op": "set", **base, "n": share}, self.call_timeout)
                    for c, share in zip(self.children, shares, strict=True)
                ),
                return_exceptions=True,
            )
            for c, r in zip(self.children, results, strict=True):
                # A slow engine gets the set when it reads its stdin; only a gone one is broken.
                if c.gone(r):
                    c.broken = True
        if any(c.broken for c in self.children):
            await self._heal()

    async def set_config(self, config: EngineConfig) -> None:
        await self.apply(config)

    async def restart(self) -> None:
        await self._call_all({"op": "restart"})

    async def reset_latency(self) -> None:
        self.retired.clear_latency()
        await self._call_all({"op": "reset_latency"})

    async def stats(self) -> Stats:
        if any(c.proc.returncode is not None for c in self.children):
            await self._heal()
        total = Stats()
        total.merge(self.retired)
        for c, a in zip(self.children, await self._call_all({"op": "stats"}), strict=True):
            if a is not None:  # else a slow engine: its last answer stands in
                c.last = Stats.from_wire(a["stats"])
            total.merge(c.last)
        return total

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children))
        self.children = []


class InlinePool:
    """One engine in this process, behind the pool interface (for ``--procs 0``)."""

    def __init__(self, config: EngineConfig, source_ips: list[str]) -> None:
        self.engine = Engine(config, source_ips)
        self.procs = 0

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    async def start(self) -> None:
        self.engine.start()
        self.engine.set_config(self.engine.config)

    async def set_config(self, config: EngineConfig) -> None:
        self.engine.set_config(config)

    async def restart(self) -> None:
        self.engine.restart()

    async def reset_latency(self) -> None:
        self.engine.reset_latency()

    async def stats(self) -> Stats:
        return self.engine.stats()

    async def close(self) -> None:
        await self.engine.close()


Pool = ProcessPool | InlinePool


def make_pool(config: EngineConfig, source_ips: list[str], procs: str | int) -> Pool:
    """``procs``: 'auto', 0 (in this process) or a fixed number of child processes."""
    if procs == "auto":
        return ProcessPool(config, source_ips, None)
    count = int(procs)
    if count == 0:
        return InlinePool(config, source_ips)
    return ProcessPool(config, source_ips, count)
