"""/v1/embeddings with aligned crops at concurrency 1, 8, 32 vs direct tritonclient calls to the same Triton.

One run starts the real tritonserver (wrapped SFace, Python backend + ONNX Runtime, dynamic
batching) and three gateways on it (their own processes, auth and rate limits off, SQLite in a
temporary directory): ``gateway`` (every request its own Triton call), ``gateway-merged``
(micro-batching, ``--merge-slots`` calls in flight) and ``gateway-shm`` (crops through system shared
memory, 8 slots). A closed-loop client sends requests of one aligned 112x112 real-face crop each
through a gateway (HTTP, JSON/base64, aiohttp) or straight to Triton (async gRPC, the baseline): to
every gateway as a PNG file, and to ``gateway`` also as its raw pixels (format rgb24, arm
``gateway-rgb24``), the input the direct arm gives Triton. The headline figures are that arm's: the
default configuration, given what direct Triton is given. Each round runs, per level,
every arm for a few seconds in an order rotated from round to round; ratios and overheads are taken
within a round, then the median over rounds is quoted with the range. Targets: overhead <= 2 ms at
concurrency 1 (p50 minus direct p50; read with ``--model tiny``, whose result file it is), throughput
>= 0.95x direct at 8 and 32 (read with SFace; those two files come from the default run).

With ``--triton-delay-ms D`` every arm reaches Triton through ``benchmarks.latency_relay`` (each chunk
held D ms each way), there is no shared-memory arm, and the result is merging's gain over the plain
gateway at concurrency 32 with Triton across a network.

    python -m benchmarks.gateway_embeddings                 # ~5 minutes
    python -m benchmarks.gateway_embeddings --model tiny    # a near-free model: the gateway's own ms show
    python -m benchmarks.gateway_embeddings --triton-delay-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.results import write_result
from cdface.core.contract import INPUT_NAME

REPO = Path(__file__).resolve().parents[1]


def _crops(n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` aligned crops of real faces (the stock photos, each face slightly re-lit per copy): the
    gateway's face check on every crop passes them, as it does a client's real crops."""
    from PIL import Image

    from cdface.core import assets
    from cdface.core.detection import Detector, extract_faces
    from cdface.core.imaging import read_image

    detector = Detector(assets.yunet_onnx())
    faces = [face.crop for path in assets.photos().values()
             for face in extract_faces(read_image(path), "detect_all", detector=detector)]
    rng = np.random.default_rng(0)
    arrays = np.stack([np.clip(faces[i % len(faces)] * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
                       for i in range(n)])
    encoded = []
    for a in arrays:
        out = io.BytesIO()
        Image.fromarray(a).save(out, format="PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode())
    return arrays, encoded


async def _drive(call, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "throughput": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}



RAW_ARM = "gateway-rgb24"  # the default gateway, sent each crop's raw pixels instead of its PNG


async def _measure(gateways: dict[str, str], grpc_url: str, levels: list[int], seconds: float, rounds: int) -> dict:
    """Every round runs each level's arms back to back, in an order rotated from round to round; at
    concurrency 1 also the HTTP floor (``gateway``'s /healthz, with aiohttp and with httpx)."""
    import json

    import aiohttp
    import httpx
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    arrays, encoded = _crops(64)
    bodies = {"png": [json.dumps({"images": [{"data": e, "mode": "aligned"}]}) for e in encoded],
              "rgb24": [json.dumps({"images": [{"data": base64.b64encode(a.tobytes()).decode(), "mode": "aligned",
                                                "format": "rgb24"}]}) for a in arrays]}
    direct = grpcaio.InferenceServerClient(grpc_url)
    # aiohttp, not httpx: a client that costs little, as the baseline's C-core gRPC client does, so that the
    # difference is the gateway's (details.http_floor_ms: both clients' round trips).
    sessions = {name: aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=64),
                                            timeout=aiohttp.ClientTimeout(total=60))
                for name, url in gateways.items()}
    # Every gateway process gets PNG crops; the default one also the crops' raw pixels (format rgb24), the
    # input the direct arm gives Triton.
    arms = {name: (name, "png") for name in gateways} | {RAW_ARM: ("gateway", "rgb24")}
    clients = {arm: sessions[name] for arm, (name, _) in arms.items()}

    def via_gateway(arm: str):
        session, payloads = clients[arm], bodies[arms[arm][1]]

        async def call(i: int) -> None:
            async with session.post("/v1/embeddings", data=payloads[i % 64],
                                    headers={"content-type": "application/json"}) as r:
                await r.read()
                r.raise_for_status()
        return call

    async def via_triton(i: int) -> None:
        tensor = InferInput(INPUT_NAME, [1, 112, 112, 3], "UINT8")
        tensor.set_data_from_numpy(arrays[i % 64: i % 64 + 1])
        await direct.infer("face", [tensor])

    async def healthz(i: int) -> None:
        async with sessions["gateway"].get("/healthz") as r:
            await r.read()
            r.raise_for_status()

    # httpx, the client most Python users reach for, only on /healthz: its own cost
    slow_client = httpx.AsyncClient(base_url=gateways["gateway"], timeout=60)

    async def healthz_httpx(i: int) -> None:
        (await slow_client.get("/healthz")).raise_for_status()

    calls = {"direct": via_triton, **{arm: via_gateway(arm) for arm in arms}}
    for call in calls.values():  # warm-up: connections, the model's first batches
        await _drive(call, 8, 1.0)
    out: dict[int, dict[str, list[dict]]] = {c: {arm: [] for arm in calls} for c in levels}
    floor: dict[str, list[float]] = {"aiohttp": [], "httpx": []}
    c1_totals: dict[str, dict[str, float]] = {arm: {} for arm in arms}  # stage seconds at concurrency 1
    for r in range(rounds):
        for c in levels:
            order = list(calls)[r % len(calls):] + list(calls)[:r % len(calls)]
            for arm in order:
                before = await _gateway_seconds(clients[arm]) if c == 1 and arm in clients else None
                out[c][arm].append(await _drive(calls[arm], c, seconds))
                if before is not None:
                    after = await _gateway_seconds(clients[arm])
                    for name, value in after.items():
                        c1_totals[arm][name] = c1_totals[arm].get(name, 0.0) + value - before.get(name, 0.0)
            if c == 1:
                floor["aiohttp"].append((await _drive(healthz, 1, seconds / 2))["p50_ms"])
                floor["httpx"].append((await _drive(healthz_httpx, 1, seconds / 2))["p50_ms"])
            print(f"round {r + 1}/{rounds} concurrency {c:>2}: " + "  ".join(
                f"{arm} {out[c][arm][-1]['throughput']:6.1f}/s p50 {out[c][arm][-1]['p50_ms']:5.1f} ms"
                for arm in calls), flush=True)
    # Mean ms per request at concurrency 1: inside the gateway ("request_s") and in each stage.
    stages = {arm: {name: round(1e3 * total / (totals.get("request") or 1.0), 3)
                    for name, total in totals.items() if name != "request" and total > 0}
              for arm, totals in c1_totals.items()}
    for session in sessions.values():
        await session.close()
    await slow_client.aclose()
    await direct.close()
    return {"levels": out, "stages_ms": stages,
            "http_floor_ms": {name: _median_range(values) for name, values in floor.items()}}


async def _gateway_seconds(client) -> dict[str, float]:
    """The gateway's cumulative seconds per stage (``cdface_stage_seconds``), its /v1/embeddings requests'
    seconds (``request_s``) and count (``request``), from its /metrics: differences around a timed run
    say where a request's time goes inside the gateway."""
    out: dict[str, float] = {}
    async with client.get("/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("cdface_stage_seconds_sum{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("cdface_http_request_seconds_sum{") and 'route="/v1/embeddings"' in line:
            out["request_s"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("cdface_http_request_seconds_count{") and 'route="/v1/embeddings"' in line:
            out["request"] = float(line.rsplit(" ", 1)[1])
    return out


def _median_range(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "per_round": [round(v, 4) for v in values]}


def summarise(raw: dict) -> dict:
    """Per level and gateway arm: throughput / direct and p50 - direct p50, round by round (same round, same
    level: the machine's state is shared), then the median over rounds and the range."""
    levels = {}
    for c, arms in raw.items():
        direct = arms["direct"]
        levels[str(c)] = {
            "direct": {"throughput": _median_range([m["throughput"] for m in direct]),
                       "p50_ms": _median_range([m["p50_ms"] for m in direct])},
            **{arm: {"throughput": _median_range([m["throughput"] for m in runs]),
                     "p50_ms": _median_range([m["p50_ms"] for m in runs]),
                     "p99_ms": _median_range([m["p99_ms"] for m in runs]),
                     "ratio_vs_direct": _median_range([m["throughput"] / d["throughput"]
                                                       for m, d in zip(runs, direct)]),
                     "overhead_p50_ms": _median_range([m["p50_ms"] - d["p50_ms"] for m, d in zip(runs, direct)])}
               for arm, runs in arms.items() if arm != "direct"}}
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s per arm and level (default 5 of 4 s)")
    parser.add_argument("--model", choices=("sface", "tiny"), default="sface",
                        help="sface: a real model (~50 ms a call here); tiny: a near-free stand-in with the real "
                             "preprocessing (benchmarks.gateway_overhead's), so the gateway's own milliseconds show")
    parser.add_argument("--merge-slots", type=int, default=2,
                        help="CDFACE_SERVE_TRITON_MERGE_SLOTS of the gateway-merged arm")
    parser.add_argument("--triton-delay-ms", type=float, default=0.0,
                        help="Triton across a network: every arm reaches it through a relay that delays each chunk "
                             "this long each way (benchmarks.latency_relay); no shared-memory arm then")
    args = parser.parse_args()
    if args.triton_delay_ms < 0:
        parser.error("--triton-delay-ms must be >= 0")
    seconds, rounds = (2.0, 3) if args.quick else (4.0, 5)
    levels = [1, 8, 32]

    from cdface.core import assets
    from cdface.devtools.triton_local import TritonServer
    from cdface.export.triton_repo import add_model_version
    from cdface.export.wrap import wrap_onnx

    with tempfile.TemporaryDirectory(prefix="cdface-bench-") as tmp:
        tmp = Path(tmp)
        if args.model == "sface":
            source, licence = assets.sface_onnx(), assets.SFACE_LICENCE
        else:
            from benchmarks.gateway_overhead import _tiny_model  # that module imports this one at its top

            source, licence = _tiny_model(tmp / "tiny.onnx"), "generated for this benchmark"
        wrap_onnx(source, tmp / "model", name=args.model, version=1, input_layout="NCHW",
                  channel_order="RGB", mean=0.0, std=1.0, licence=licence)
        add_model_version(tmp / "repo", "face", tmp / "model", backend="python", max_batch_size=32,
                          preferred=[8, 32], queue_delay_us=2_000)
        with TritonServer(tmp / "repo", log_path=tmp / "triton.log") as server, \
                _reached_through(server.grpc_url, args.triton_delay_ms) as triton_url:
            settings = {"gateway": {"CDFACE_SERVE_TRITON_MERGE_SLOTS": "0"},
                        "gateway-merged": {"CDFACE_SERVE_TRITON_MERGE_SLOTS": str(args.merge_slots)},
                        "gateway-shm": {"CDFACE_SERVE_TRITON_SHARED_MEMORY_SLOTS": "8"}}
            if args.triton_delay_ms:
                del settings["gateway-shm"]  # shared memory needs Triton on the same host
            # one client address sends far more than the default rate limit (600/minute) allows
            gateways = {arm: start_gateway(sys.executable, REPO, tmp, arm, triton_url, tmp / "repo",
                                           {"CDFACE_SERVE_RATE_LIMIT": "none", **env})
                        for arm, env in settings.items()}
            try:
                measured = asyncio.run(_measure({arm: url for arm, (_, url) in gateways.items()}, triton_url,
                                           levels, seconds, rounds))
            finally:
                for process, _ in gateways.values():
                    process.terminate()
                    process.wait(timeout=20)
    levels_summary = summarise(measured["levels"])
    details = {"levels": levels_summary, "stages_ms": measured["stages_ms"],
               "http_floor_ms": measured["http_floor_ms"], "rounds": rounds,
               "seconds_per_arm": seconds, "merge_slots": args.merge_slots,
               "arms": ["direct", *settings, RAW_ARM], "triton_delay_ms_each_way": args.triton_delay_ms,
               "inputs": f"each crop as a PNG file (27 KB), base64 in JSON; {RAW_ARM}: the default gateway sent the "
                         "crop's raw pixels (format rgb24, 37,632 bytes, base64 in JSON), as the direct arm sends "
                         "Triton",
               "model": ("wrapped SFace (128-d)" if args.model == "sface" else
                         "a near-free 128-d stand-in (mean colour, projected)")
               + ", Triton Python backend + ONNX Runtime, dynamic batching",
               "client": "one asyncio process: aiohttp to the gateways, tritonclient gRPC aio to Triton; "
                         "http_floor_ms: a round trip to the gateway's /healthz (p50, concurrency 1, median "
                         "over rounds) with aiohttp and, for its own cost, httpx"}
    if args.triton_delay_ms:  # does merging pay off when every call crosses a network?
        write_result("gateway_embeddings_remote_triton_c32",
                     f"aligned-crop requests/s through the merging gateway (gateway-merged, {args.merge_slots} calls in "
                     f"flight) / the plain gateway at concurrency 32, Triton {args.triton_delay_ms:g} ms away each way "
                     "(a delaying relay); median over rounds (details.levels: both vs direct Triton, every level)",
                     _median_range([m["throughput"] / p["throughput"] for m, p in
                                    zip(measured["levels"][32]["gateway-merged"], measured["levels"][32]["gateway"])]
                                   )["median"], None, "reported", details)
        return
    # The headline: the gateway as configured by default, given the input the direct arm gives Triton (a
    # crop's pixels); details.levels has every arm, the PNG one among them.
    arm = RAW_ARM
    if args.model == "tiny":  # the gateway's own milliseconds show only beside a near-free model
        write_result("gateway_embeddings_tiny_overhead_c1",
                     f"ms the gateway adds to an aligned-crop /v1/embeddings request at concurrency 1 ({arm}: the "
                     "crop's pixels, as direct Triton gets them; near-free model; p50 minus direct Triton gRPC p50, "
                     "same round; median over rounds; details: the PNG arm, stages_ms: where it goes)",
                     levels_summary["1"][arm]["overhead_p50_ms"]["median"], None, "value <= 2.0", details)
        return
    for c in (8, 32):  # throughput ratios mean something only with a real model's cost behind them
        ratio = levels_summary[str(c)][arm]["ratio_vs_direct"]
        write_result(f"gateway_embeddings_vs_direct_c{c}",
                     f"aligned-crop requests/s through the gateway ({arm}: the crop's pixels, as direct Triton gets "
                     f"them) / direct Triton gRPC at concurrency {c}, same round; median over rounds (details.levels: "
                     "every arm, the PNG ones among them, every level, the range)",
                     ratio["median"], None, "value >= 0.95", details)


@contextlib.contextmanager
def _reached_through(grpc_url: str, delay_ms: float) -> Iterator[str]:
    """``grpc_url`` itself, or (``delay_ms`` > 0) the address of a relay to it that delays every chunk."""
    if not delay_ms:
        yield grpc_url
        return
    from cdface.devtools.triton_local import free_port

    listen = f"127.0.0.1:{free_port()}"
    relay = subprocess.Popen([sys.executable, "-m", "benchmarks.latency_relay", "--listen", listen, "--to", grpc_url,
                              "--delay-ms", str(delay_ms)], cwd=REPO)
    try:
        yield listen
    finally:
        relay.terminate()
        relay.wait(timeout=20)


def start_gateway(python: str, cwd: Path, tmp: Path, name: str, triton_grpc: str, repo: Path,
                   extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A gateway process on ``triton_grpc`` (auth off, its own SQLite under ``tmp``) and its URL once ready."""
    import httpx

    from cdface.devtools.triton_local import free_port

    port = free_port()
    env = {**os.environ, "CDFACE_SERVE_PORT": str(port), "CDFACE_SERVE_DB_PATH": str(tmp / f"{name}.db"),
           "CDFACE_SERVE_CREATE_DB": "1", "CDFACE_SERVE_TRITON_URL": triton_grpc,
           "CDFACE_SERVE_MODEL_REPOSITORY": str(repo), "CDFACE_SERVE_AUTH": "false",
           "CDFACE_SERVE_LOG_LEVEL": "warning", **extra}
    proc = subprocess.Popen([python, "-m", "cdface.serving.cli", "serve"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"gateway {name} exited: {(tmp / f'{name}.log').read_text()[-1500:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"gateway {name} did not become ready: {(tmp / f'{name}.log').read_text()[-1500:]}")


if __name__ == "__main__":
    main()
