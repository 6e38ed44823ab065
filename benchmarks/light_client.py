"""A protocol-2 fedplug client in plain Python (numpy + safetensors, no torch), written from docs/protocol.md.

Used by benchmarks/bench_server_memory.py as a cheap no-op site: it downloads
the global weights in chunks, adds ``--delta`` to every floating tensor (the
"training"), uploads the result in chunks, and answers evaluations with empty
statistics.  Being light, many of them fit on one machine, so what is measured
is the server.

    python benchmarks/light_client.py --url http://127.0.0.1:5000 --id site1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys

import numpy as np
import socketio
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


class LightClient:
    def __init__(self, url: str, client_id: str, delta: float, num_train: int):
        self.url, self.client_id, self.delta, self.num_train = url, client_id, delta, num_train
        # aiohttp refuses WebSocket messages over 4 MiB by default; a chunk plus its framing can be more
        self.sio = socketio.AsyncClient(reconnection=True, websocket_extra_options={"max_msg_size": 2**27})
        self.done = asyncio.Event()
        self.num_classes = 0
        sio = self.sio

        @sio.event
        async def connect():
            await sio.emit("client_wake_up", {"client_id": client_id, "protocol_version": 2})

        @sio.on("init")
        async def init(data):
            self.num_classes = len(data["class_names"])
            await sio.emit("client_ready", {"client_id": client_id, "num_train": num_train, "num_test": 1})

        @sio.on("check_client_resource")
        async def check(data):
            await sio.emit("check_client_resource_done", {"round_number": data["round_number"], "load_rate": 0.0})

        @sio.on("request_update")
        async def request_update(data):
            asyncio.get_running_loop().create_task(self.train(data))

        @sio.on("stop_and_eval")
        async def stop_and_eval(data):
            asyncio.get_running_loop().create_task(self.evaluate(data))

        @sio.on("run_finished")
        async def run_finished(data):
            self.done.set()

        @sio.on("protocol_error")
        async def protocol_error(data):
            print(f"[{client_id}] rejected: {data}", file=sys.stderr, flush=True)

    async def fetch(self, ref: dict) -> bytes:
        out = bytearray(ref["size"])
        for index in range(ref["num_chunks"]):
            reply = await self.sio.call("fetch_chunk", {"weights_id": ref["id"], "index": index}, timeout=120)
            assert reply["ok"], reply
            assert hashlib.sha256(reply["data"]).hexdigest() == reply["sha256"]
            start = index * ref["chunk_bytes"]
            out[start:start + len(reply["data"])] = reply["data"]
        assert hashlib.sha256(out).hexdigest() == ref["sha256"]
        return bytes(out)

    async def upload(self, rnd: int, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        opened = await self.sio.call("begin_upload", {"round_number": rnd, "size": len(data), "sha256": digest},
                                     timeout=120)
        assert opened["ok"], opened
        size, index = opened["chunk_bytes"], opened["next_index"]
        view = memoryview(data)
        while index < opened["num_chunks"]:
            chunk = bytes(view[index * size:(index + 1) * size])
            reply = await self.sio.call("upload_chunk", {"upload_id": opened["upload_id"], "index": index,
                                                         "data": chunk,
                                                         "sha256": hashlib.sha256(chunk).hexdigest()}, timeout=120)
            assert reply["ok"], reply
            index = reply["next_index"]
        return opened["upload_id"]

    async def train(self, data: dict) -> None:
        rnd = data["round_number"]
        state = st_load(await self.fetch(data["weights_ref"]))
        trained = {k: (v + np.asarray(self.delta, dtype=v.dtype) if v.dtype.kind == "f" else v)
                   for k, v in state.items()}
        upload_id = await self.upload(rnd, st_save(trained))
        await self.sio.emit("client_update", {"round_number": rnd, "ok": True, "weights_ref": upload_id,
                                              "train_size": self.num_train, "train_loss": 0.5})

    async def evaluate(self, data: dict) -> None:
        await self.fetch(data["weights_ref"])
        n = self.num_classes
        await self.sio.emit("client_eval", {
            "round_number": data["round_number"], "ok": True, "test_size": 1, "test_loss": 0.5,
            "test_map": 0.0, "test_recall": 0.0,
            "stats": {"num_classes": n, "scores": [[] for _ in range(n)],
                      "true_positive": [[] for _ in range(n)], "num_ground_truth": [1] * n}})
        if data.get("STOP"):
            self.done.set()

    async def run(self) -> int:
        for _ in range(120):
            try:
                await self.sio.connect(self.url, transports=["websocket"])
                break
            except socketio.exceptions.ConnectionError:
                await asyncio.sleep(0.5)
        else:
            return 3
        await self.done.wait()
        await self.sio.disconnect()
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=10)
    args = parser.parse_args()
    return asyncio.run(LightClient(args.url, args.id, args.delta, args.num_train).run())


if __name__ == "__main__":
    sys.exit(main())
