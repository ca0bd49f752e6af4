"""The baseline: a bare pyzmq ROUTER that echoes, or streams n frames, with no kernel around it."""

from __future__ import annotations

import sys

import msgpack
import zmq


def main(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    # No high-water mark: otherwise this ROUTER silently drops a long stream's frames.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        peer, frame = sock.recv_multipart()
        msg = msgpack.unpackb(frame)
        if msg.get("op") == "stream":
            for i in range(msg["n"]):
                sock.send_multipart([peer, msgpack.packb({"text": " tok", "i": i})])
            sock.send_multipart([peer, msgpack.packb({"done": True})])
        elif msg.get("op") == "quit":
            sock.send_multipart([peer, frame])
            return
        else:
            sock.send_multipart([peer, frame])


if __name__ == "__main__":
    main(sys.argv[1])
