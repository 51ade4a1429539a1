"""Spawns one process per rank and talks to them over pipes. Any rank that fails or dies fails the whole
group at once, with its error message, and every other rank is terminated: no hang, no orphan."""
from __future__ import annotations

import multiprocessing as mp
import socket
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

from dcpserve.config import EngineArgs, ModelConfig


class EngineDeadError(RuntimeError):
    """A rank failed or exited; the engine cannot continue."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    def __init__(self, args: EngineArgs, cfg: ModelConfig, start_timeout_s: float = 600.0):
        from dcpserve.engine.worker import worker_main

        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs, self.conns = [], []
        self.closed = False
        for rank in range(args.tp):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_main, args=(rank, args, cfg, init_method, child), daemon=True,
                            name=f"dcpserve-rank{rank}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            self.info = self._collect(set(range(args.tp)), start_timeout_s, "start-up")[0][1]
        except BaseException:
            self.close()
            raise

    def _collect(self, want: set[int], timeout: float | None, what: str) -> dict[int, tuple]:
        """Wait for one message from each rank in `want`, watching every rank for an error or death."""
        got: dict[int, tuple] = {}
        while len(got) < len(want):
            waitables = list(self.conns) + [p.sentinel for p in self.procs]
            if not wait(waitables, timeout=timeout):
                missing = sorted(want - set(got))
                raise EngineDeadError(f"rank {missing[0]} did not answer within {timeout:.0f} s during {what}")
            for i, c in enumerate(self.conns):
                while i not in got and c.poll():
                    try:
                        msg = c.recv()
                    except EOFError:
                        raise EngineDeadError(self._death_reason(i, what)) from None
                    if msg[0] == "error":
                        raise EngineDeadError(f"rank {i} failed during {what}: {msg[1]}")
                    if i in want:
                        got[i] = msg
            for i, p in enumerate(self.procs):
                if not p.is_alive() and i not in got:
                    if self.conns[i].poll():
                        continue  # read its last message (likely an error) on the next pass
                    raise EngineDeadError(self._death_reason(i, what))
        return got

    def _death_reason(self, rank: int, what: str) -> str:
        code = self.procs[rank].exitcode
        return f"rank {rank} exited unexpectedly during {what} (exit code {code})"

    def send(self, request) -> None:
        """Send a message to every rank without waiting for an answer."""
        if self.closed:
            raise EngineDeadError("engine is shut down")
        data = ForkingPickler.dumps(request)  # once, not once per rank: the plan is the same for all
        try:
            for c in self.conns:
                c.send_bytes(data)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close()
            raise EngineDeadError("a rank process is gone") from None

    def collect(self, timeout: float | None = None):
        """Rank 0's next answer (answers come in the order the steps were sent)."""
        try:
            return self._collect({0}, timeout, "a step")[0]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()

    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self.procs)
