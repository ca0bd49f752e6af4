"""A manager for benchmarks: echoes small requests, streams token-sized frames."""

from __future__ import annotations

from allm.kernel.contract import ManagerInfo, Reply, RequestContext


class EchoManager:
    inline_ops = frozenset({"ping"})

    def models(self) -> tuple[str, ...]:
        return ()

    def close(self) -> None:
        pass

    def handle(self, ctx: RequestContext) -> Reply:
        if ctx.op == "stream":
            n = int(ctx.params["n"])
            for i in range(n):
                ctx.emit({"text": " tok", "i": i})
            return Reply({"sent": n})
        return Reply(ctx.params)  # "echo" (worker thread) and "ping" (I/O thread)


def create(info: ManagerInfo) -> EchoManager:
    return EchoManager()
