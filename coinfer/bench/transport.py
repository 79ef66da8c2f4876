"""``coinfer bench transport``: one activation device -> edge through mosquitto against raw TCP (the round trip's
parts), each encoding's bytes and costs, and where an encoding pays (numbers to a file, never asserted as
wall-clock limits in tests)."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from models import loaders
from models.bundle import load_bundle
from planner import candidates
from planner.core import Conditions, ExitInfo
from planner.latency import LatencyModel

TRANSPORT_SIZES = (4096, 65536, 1 << 20)


def transport_bench(sizes: tuple[int, ...] = TRANSPORT_SIZES, repeats: int = 30) -> dict[str, Any]:
    """One activation of each size, device -> edge on loopback: MQTT (encode, broker, decode) vs raw TCP, the
    round trip's parts, and the same tensor in each encoding.

    ``broker_floor_s`` is the same payload through the same mosquitto from a minimal blocking-socket MQTT
    client (no paho, no msgpack): what the broker hop alone costs, whatever the client library.
    """
    import asyncio
    import tempfile
    from pathlib import Path

    from coinfer.lab.procs import REPO, Mosquitto

    with tempfile.TemporaryDirectory(prefix="coinfer-bench-") as tmp, \
            Mosquitto.from_template(REPO / "mosquitto.conf", Path(tmp)) as broker:
        port = broker.port
        rows, encoded = asyncio.run(_transport(port, sizes, repeats))
        for row in rows:
            row["broker_floor_s"] = _raw_mqtt_roundtrip(port, int(row["bytes"]), repeats)
    bundle = load_bundle()
    breakeven = encoding_breakeven(bundle.exits, loaders.load_latency_model(loaders.PI3_MODEL),
                                   loaders.load_latency_model(loaders.DESKTOP_MODEL))
    return {"rows": rows, "encodings": encoded, "breakeven": {"bundle": bundle.name, "models": "Edgent's Pi 3 and "
                                                              "desktop", "rows": breakeven},
            "repeats": repeats, "host": {"machine": platform.machine()},
            "note": "medians; loopback; MQTT v5 at the daemons' QoS for requests through mosquitto incl. msgpack "
                    "encode/decode and validation; parts: encode (msgpack + tensor encoding), publish (session.send "
                    "returns), arrive (the message reaches our iterator: broker and paho), decode (validation and "
                    "tensor decoding); TCP = the same bytes length-prefixed over one asyncio stream; broker_floor = "
                    "raw MQTT 3.1.1 QoS 0 publish to itself through mosquitto, blocking sockets; encodings: a "
                    "ReLU-like float32 tensor (half zeros) in each wire encoding"}


async def _transport(port: int, sizes: tuple[int, ...], repeats: int
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import asyncio
    import socket

    from protocol.session import BrokerConfig, client
    from protocol.tensors import ENCODINGS

    rows, encoded = [], []
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                n = int.from_bytes(await reader.readexactly(8), "little")
                await received.put(await reader.readexactly(n))
            except asyncio.IncompleteReadError:
                return

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    tcp_port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    async with client(BrokerConfig(port=port), identifier="bench-transport", will_topic="bench/status",
                      sender="bench") as mqtt:
        await mqtt.subscribe("bench/act", qos=1)
        messages = mqtt.messages.__aiter__()
        for size in sizes:
            tensor = np.frombuffer(np.random.default_rng(size).bytes(size), dtype=np.float32).reshape(1, -1)
            tensor = np.where(np.isfinite(tensor), tensor, 0.0).astype(np.float32)
            parts = await _mqtt_roundtrips(mqtt, messages, tensor, "float32", repeats)
            tcp_t = []
            for _ in range(repeats):
                start = time.perf_counter()
                data = tensor.tobytes()
                writer.write(len(data).to_bytes(8, "little") + data)
                await writer.drain()
                await received.get()
                tcp_t.append(time.perf_counter() - start)
            m, t = parts["total_s"], float(np.median(tcp_t))
            rows.append({"bytes": size, "mqtt_s": m, "tcp_s": t, "ratio": m / t,
                         "parts_s": {k: v for k, v in parts.items() if k not in ("total_s", "wire_bytes")}})
            relu = np.maximum(np.random.default_rng(size).standard_normal(size // 4), 0).astype(np.float32)
            for name in ENCODINGS:
                got = await _mqtt_roundtrips(mqtt, messages, relu.reshape(1, -1), name, repeats)
                encoded.append({"bytes": size, "encoding": name, "mqtt_s": got["total_s"],
                                "wire_bytes": got["wire_bytes"], "encode_s": got["encode_s"],
                                "decode_s": got["decode_s"]})
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return rows, encoded


async def _mqtt_roundtrips(mqtt: Any, messages: Any, tensor: np.ndarray, encoding: str,
                           repeats: int) -> dict[str, float]:
    """Median seconds of each part of a request's trip through the broker and back to us, and its size."""
    from protocol.messages import InferRequest, decode, encode
    from protocol.session import send

    times: dict[str, list[float]] = {k: [] for k in ("encode_s", "publish_s", "arrive_s", "decode_s", "total_s")}
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload = encode(InferRequest(request_id="b", device_id="bench", bundle="0" * 64, exit=1, cut=1,
                                      tensors={"t": tensor}, budget_s=1.0, encoding=encoding))
        t1 = time.perf_counter()
        await send(mqtt, "bench/act", payload)
        t2 = time.perf_counter()
        message = await anext(messages)
        t3 = time.perf_counter()
        assert isinstance(message.payload, bytes)
        decode(message.payload)
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            times[k].append(v)
        size = len(payload)
    return {**{k: float(np.median(v)) for k, v in times.items()}, "wire_bytes": float(size)}


def encoding_breakeven(exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel,
                       bandwidths: Sequence[float] = tuple(np.geomspace(10e3, 1e9, 401))) -> list[dict[str, Any]]:
    """Per exit and encoding: the highest bandwidth at which that exit's fastest plan in the encoding beats its
    fastest float32 plan (predicted, no deadline), and the accuracy it costs there."""
    c = candidates.compile_candidates(exits, device, edge)
    totals = [candidates.latencies(c, Conditions(bandwidth_bps=float(bw), deadline_s=1.0))[0] for bw in bandwidths]
    rows = []
    for ex in exits:
        mine = c.exit == ex.index
        for name in sorted({c.encoding[i] for i in np.flatnonzero(mine & ~c.plain)}):
            enc = mine & np.array([e == name for e in c.encoding])
            pays, at = 0.0, None
            for bw, total in zip(bandwidths, totals, strict=True):
                best = int(np.flatnonzero(enc)[np.argmin(total[enc])])
                if total[best] < total[mine & c.plain].min():
                    pays, at = float(bw), best
            rows.append({"exit": ex.index, "encoding": name, "pays_below_bps": pays,
                         "accuracy_cost": None if at is None else round(ex.accuracy - float(c.accuracy[at]), 4),
                         "cut": None if at is None else sorted(c.tensors[at])})
    return rows


def _raw_mqtt_roundtrip(port: int, size: int, repeats: int) -> float:
    """Median time to publish ``size`` bytes at QoS 0 and receive them back, with hand-built MQTT 3.1.1 packets."""
    import socket

    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    def packet(kind: int, body: bytes) -> bytes:
        n, length = len(body), bytearray()
        while True:
            n, digit = divmod(n, 128)
            length.append(digit | (0x80 if n else 0))
            if not n:
                return bytes([kind]) + bytes(length) + body

    def read(sock: socket.socket, n: int) -> memoryview:
        buf = memoryview(bytearray(n))
        got = 0
        while got < n:
            got += sock.recv_into(buf[got:])
        return buf

    def read_packet(sock: socket.socket) -> memoryview:
        read(sock, 1)
        n, scale = 0, 1
        while True:
            digit = read(sock, 1)[0]
            n, scale = n + (digit & 127) * scale, scale * 128
            if not digit & 128:
                return read(sock, n)

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(packet(0x10, field(b"MQTT") + bytes([4, 2]) + (60).to_bytes(2, "big") + field(b"bench-raw")))
        read_packet(sock)  # CONNACK
        sock.sendall(packet(0x82, (1).to_bytes(2, "big") + field(b"bench/raw") + b"\x00"))
        read_packet(sock)  # SUBACK
        data, times = bytes(size), []
        for _ in range(repeats):
            start = time.perf_counter()
            sock.sendall(packet(0x30, field(b"bench/raw") + data))
            read_packet(sock)
            times.append(time.perf_counter() - start)
    return float(np.median(times))
