"""The JSON-lines peer both process pipes speak: two peers over a real socketpair."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from service.jsonlines import Message, Peer, PeerGone


async def pair(
    handlers: dict[str, Any], limit: int = 1 << 16
) -> tuple[Peer, Peer, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a, limit=limit)
    rb, wb = await asyncio.open_connection(sock=b, limit=limit)
    client = Peer(ra, wa, name="client")
    server = Peer(rb, wb, handlers, name="server")
    return client, server, wb


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


def test_calls_are_answered_by_rid_even_out_of_order() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def slow(msg: Message) -> Message:
            await gate.wait()
            return {"who": "slow"}

        async def fast(msg: Message) -> Message:
            return {"who": "fast", "x": msg["x"] * 2}

        client, server, _ = await pair({"slow": slow, "fast": fast})
        tasks = [asyncio.create_task(p.run()) for p in (client, server)]
        first = asyncio.create_task(client.call({"op": "slow"}, 5))
        await asyncio.sleep(0.05)  # the slow call is out first
        answer = await client.call({"op": "fast", "x": 21}, 5)
        assert answer == {"rid": 2, "ok": True, "who": "fast", "x": 42}
        gate.set()
        assert (await first)["who"] == "slow"
        client.close()
        await asyncio.gather(*tasks)
        server.close()

    run(main())


def test_refusals_name_the_op_and_the_problem() -> None:
    async def main() -> None:
        async def picky(msg: Message) -> Message:
            raise ValueError("needs msg with data")

        async def buggy(msg: Message) -> Message:
            raise RuntimeError("boom")

        client, server, _ = await pair({"picky": picky, "buggy": buggy})
        tasks = [asyncio.create_task(p.run()) for p in (client, server)]
        assert (await client.call({"op": "nope"}, 5))["error"] == "unknown op 'nope'"
        assert (await client.call({"op": "picky"}, 5))["error"] == "picky: needs msg with data"
        answer = await client.call({"op": "buggy"}, 5)
        assert answer["ok"] is False and answer["error"] == "buggy: internal error: boom"
        client.close()
        await asyncio.gather(*tasks)
        server.close()

    run(main())


def test_a_request_without_rid_is_served_and_not_answered() -> None:
    async def main() -> None:
        seen: list[Message] = []

        async def ready(msg: Message) -> None:
            seen.append(msg)

        async def ping(msg: Message) -> Message:
            return {}

        client, server, _ = await pair({"ready": ready, "ping": ping})
        tasks = [asyncio.create_task(p.run()) for p in (client, server)]
        client.send({"op": "ready", "pid": 7})
        assert (await client.call({"op": "ping"}, 5))["rid"] == 1  # the next line is this answer
        assert seen == [{"op": "ready", "pid": 7}]
        client.close()
        await asyncio.gather(*tasks)
        server.close()

    run(main())


def test_a_bad_line_gets_an_error_and_the_stream_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def ping(msg: Message) -> Message:
            return {"pong": True}

        client, server, _ = await pair({"ping": ping})
        server_task = asyncio.create_task(server.run())
        client.writer.write(b"{nope\n[1,2]\n")
        first = await client.reader.readline()
        second = await client.reader.readline()
        assert b'"rid":null' in first and b"bad JSON line: not JSON" in first
        assert b"a JSON list, not an object" in second
        client_task = asyncio.create_task(client.run())
        assert (await client.call({"op": "ping"}, 5))["pong"] is True
        client.close()
        await asyncio.gather(server_task, client_task)
        server.close()

    run(main())


def test_calls_still_waiting_fail_when_the_other_side_goes() -> None:
    async def main() -> None:
        async def never(msg: Message) -> Message:
            await asyncio.Event().wait()
            return {}

        client, server, server_writer = await pair({"never": never})
        client_task = asyncio.create_task(client.run())
        server_task = asyncio.create_task(server.run())
        waiting = asyncio.create_task(client.call({"op": "never"}, 5))
        await asyncio.sleep(0.05)
        server_task.cancel()
        server_writer.close()
        with pytest.raises(PeerGone, match="client: closed"):
            await waiting
        assert isinstance(await client_task, PeerGone)
        with pytest.raises(PeerGone):
            client.call_nowait({"op": "never"})  # nothing more is sent to a gone peer
        client.close()

    run(main())


def test_a_line_over_the_limit_ends_the_peer() -> None:
    async def main() -> None:
        client, server, _ = await pair({}, limit=1024)
        task = asyncio.create_task(server.run())
        client.writer.write(b'{"op":"x","pad":"' + b"a" * 4096 + b'"}\n')
        gone = await task
        assert "a line over the limit" in str(gone)
        client.close()
        server.close()

    run(main())
