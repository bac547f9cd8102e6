"""A TCP relay that delays every chunk by a fixed time in each direction: a network link on one host.

The benchmarks use it to put Triton "across a network" (``gateway_embeddings --triton-delay-ms``):
this machine's kernel has no ``netem`` (tc's network emulator), so the delay is added here, in a
process of its own. It is a stand-in for latency only: bandwidth is the loopback's, and the relay's
own cost (a few tens of microseconds a chunk) adds to every arm that goes through it alike.

    python -m benchmarks.latency_relay --listen 127.0.0.1:9001 --to 127.0.0.1:8001 --delay-ms 1
"""

from __future__ import annotations

import argparse
import asyncio


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay_s, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, b""))  # the end of the stream, after what is still on its way
    try:
        await sender
    except ConnectionError:
        pass


async def relay(listen: tuple[str, int], to: tuple[str, int], delay_s: float) -> None:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*to)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_forward(client_reader, server_writer, delay_s),
                             _forward(server_reader, client_writer, delay_s))

    server = await asyncio.start_server(connection, *listen)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="host:port to accept connections on")
    parser.add_argument("--to", type=_address, required=True, help="host:port to relay them to")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay of every chunk, each direction")
    args = parser.parse_args()
    try:
        from uvloop import run  # the gateway's own event loop: the relay should cost as little as it can
    except ImportError:
        run = asyncio.run
    run(relay(args.listen, args.to, args.delay_ms / 1e3))


if __name__ == "__main__":
    main()
