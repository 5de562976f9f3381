"""Serving speed: fabric's Serve app vs a bare FastAPI+uvicorn process serving the same model.

    python benchmarks/serve.py [--duration 3] [--repeat 3] [--concurrency 1 4 16 64] [--models cheap heavy]
                               [--sides fabric plain same] [--serve-override serve.fast_path=false ...]
                               [--monitor-concurrency 16]

Three servers answer the same Open Inference Protocol request (one row) with the same model through the
same ONNX Runtime session settings (one intra-op thread):

* ``fabric``: ``fabric.serve.deploy`` with its defaults (the fast path: HAProxy ingress and the gRPC data
  plane; adaptive ``@serve.batch``; one replica);
* ``plain``: what one writes without fabric: one uvicorn process (uvloop, httptools) running a FastAPI
  app with pydantic request and response models, one engine call per request;
* ``same``: fabric's own ASGI app in one uvicorn process, no Ray, no batching (isolates Serve's cost).

Two models: ``cheap`` (4 -> 16 -> 3: about 15 us a call, HTTP dominates) and ``heavy`` (32 -> 4 x 2048
-> 2, 51 MB of weights: about 2.5 ms a call at batch 1 and 6 ms at batch 16 on one core, so batching pays).

A second table puts the drift monitor's cost on the same load: two fabric apps serving the same model
with named-column input (what the monitor reads; tensor input is not monitored), one with
``monitor.enabled=false`` and one feeding a real monitor actor with every row (``sample_rate=1``, its
defaults otherwise), measured back to back the same way. The goal: under 5% throughput lost.

Load: N closed-loop keep-alive HTTP/1.1 clients in a separate process (plain asyncio sockets, so the
client costs every side the same little CPU). Every point runs all sides back to back, the order
rotating, ``--repeat`` times; the table shows the run with the median throughput. Takes about six
minutes on a 2-core machine; other load on the machine shows up as noise, so compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel  # the plain baseline's request and response models (below)

from fabric.runtime import free_port

MODELS = {
    # name: (input_dim, hidden_size, num_layers, num_classes)
    "cheap": (4, 16, 1, 3),
    "heavy": (32, 2048, 4, 2),
}


# --------------------------------------------------------------------------- the load generator (own process)


async def _client(
    host: str, port: int, path: str, body: bytes, deadline: float, lat: list[float], bad: list[bytes]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                if key.lower() == "content-length":
                    length = int(value)
                elif key.lower() == "transfer-encoding" and "chunked" in value:
                    chunked = True
            if chunked:
                while (size := int((await reader.readline()).strip(), 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readline()
            else:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - start)
            if status.split()[1:2] != [b"200"]:
                bad.append(status)
    finally:
        writer.close()


def generate_load(url: str, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load: ``clients`` connections, each sending the next request when the last answered."""
    u = urlsplit(url)
    lat: list[float] = []
    bad: list[bytes] = []

    async def run() -> float:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(
            *(
                _client(u.hostname or "127.0.0.1", u.port or 80, u.path, body, deadline, lat, bad)
                for _ in range(clients)
            )
        )
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": len(bad),
    }


def measure(url: str, body: bytes, clients: int, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    """Warm up, then measure, in a fresh client process."""
    cmd = [sys.executable, __file__, "--_load", url, str(clients), str(seconds), str(warmup)]
    out = subprocess.run(cmd, input=body, capture_output=True, check=True, timeout=seconds + warmup + 120)
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- models and servers


def make_model(folder: Path, input_dim: int, hidden: int, layers: int, classes: int) -> Path:
    """A trained-shape artifact (model.pt + model.json) and its ONNX export."""
    import torch

    from fabric.export import export_onnx
    from fabric.models import build_mlp, model_spec, save_model

    torch.manual_seed(0)
    kwargs = {
        "input_dim": input_dim,
        "output_dim": classes,
        "hidden_size": hidden,
        "num_layers": layers,
        "dropout": 0.0,
    }
    model = build_mlp(**kwargs).eval()
    names = [f"x{i}" for i in range(input_dim)]
    save_model(
        folder, model, model_spec("mlp", kwargs, task="classification", feature_names=names, num_classes=classes)
    )
    export_onnx(model, input_dim, folder / "model.onnx")
    return folder


def config(folder: Path, run_dir: Path, name: str, port: int, overrides: list[str], app: str | None = None) -> Any:
    from fabric.config import load_config

    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"serve.model_uri={folder}",
            f"serve.model_name={name}",
            f"serve.app_name={app or name}",
            f"serve.route_prefix=/{app or name}",
            f"serve.port={port}",
            "monitor.enabled=false",
            *overrides,
        ],
    )


def bare_server(folder: str, run_dir: str, name: str, port: int) -> None:
    """The baseline: the same FastAPI app and engine in one uvicorn process, no Ray, no batching."""
    import uvicorn

    from fabric.serve.api import make_asgi
    from fabric.serve.service import build_service

    cfg = config(Path(folder), Path(run_dir), name, port, [])
    uvicorn.run(make_asgi(build_service(cfg)), host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


class Output(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[int]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[Output]


def plain_server(folder: str, name: str, port: int) -> None:
    """The other baseline: what one writes without fabric — a FastAPI app with pydantic request and
    response models around the same ONNX Runtime session (one intra-op thread), one call per request."""
    import numpy as np
    import uvicorn
    from fastapi import FastAPI

    from fabric.export import session

    sess = session(Path(folder) / "model.onnx", threads=1)
    input_name = sess.get_inputs()[0].name

    app = FastAPI()

    @app.post("/v2/models/{model}/infer", response_model=InferResponse)
    async def infer(model: str, req: InferRequest) -> InferResponse:
        x = np.asarray(req.inputs[0].data, dtype=np.float32).reshape(req.inputs[0].shape)
        z = sess.run(None, {input_name: x})[0]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return InferResponse(
            model_name=model,
            model_version="1",
            id=req.id,
            outputs=[
                Output(name="label", shape=[len(x)], datatype="INT64", data=probs.argmax(axis=1).tolist()),
                Output(name="probabilities", shape=list(probs.shape), datatype="FP32", data=probs.ravel().tolist()),
            ],
        )

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def request_body(input_dim: int) -> bytes:
    row = [round(0.1 * (i % 7) - 0.3, 3) for i in range(input_dim)]
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [1, input_dim], "datatype": "FP32", "data": row}]}
    ).encode()


def records_body(input_dim: int) -> bytes:
    """One row as named columns (``instances``): the input the drift monitor sees."""
    return json.dumps({"instances": [{f"x{i}": round(0.1 * (i % 7) - 0.3, 3) for i in range(input_dim)}]}).encode()


def start_monitor(input_dim: int, overrides: list[str]) -> Any:
    """The drift-monitor actor (Ray connected) over a reference the benchmark's rows could come from."""
    import numpy as np
    import pandas as pd

    from fabric.config import load_config
    from fabric.monitor import start

    cfg = load_config(None, overrides).monitor
    rng = np.random.default_rng(0)
    reference = pd.DataFrame(rng.normal(0, 0.3, (1000, input_dim)), columns=[f"x{i}" for i in range(input_dim)])
    return start(cfg, reference, task="classification")


def monitor_overrides(name: str) -> list[str]:
    return [
        "monitor.enabled=true",
        f"monitor.actor_name=bench-monitor-{name}",
        "monitor.detached=false",
    ]


def compare_monitor(
    name: str, urls: dict[str, str], clients: list[int], duration: float, repeat: int, handle: Any
) -> list[dict[str, Any]]:
    """Monitor off vs on, same named-column load, back to back with the order rotating; median runs."""
    import ray

    body = records_body(MODELS[name][0])
    path = f"/v2/models/{name}/infer"
    rows = []
    for c in clients:
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for rep in range(repeat):
            for side in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                runs[side].append(measure(urls[side] + path, body, c, duration))
        best = {side: sorted(r, key=lambda m: m["rps"])[len(r) // 2] for side, r in runs.items()}
        st = ray.get(handle.stats.remote(), timeout=60)
        rows.append({"model": name, "clients": c, **best, "received": st["received"], "dropped": st["dropped"]})
        print(
            f"  {name:5s} c={c:<3d} monitor off {best['off']['rps']:6.0f} req/s | on {best['on']['rps']:6.0f} req/s "
            f"({best['on']['rps'] / best['off']['rps']:.3f}x); monitor received {st['received']}, "
            f"dropped {st['dropped']}",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- the run


SIDES = {
    "fabric": "fabric: Ray Serve, fast path, adaptive batching",
    "plain": "uvicorn: a plain FastAPI app (pydantic models), same ONNX session",
    "same": "uvicorn: fabric's own FastAPI app, no Ray, no batching",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per point (after 1 s of warm-up)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point; the median-throughput run is shown")
    p.add_argument(
        "--serve-override", nargs="*", default=[], help="overrides for fabric's side, e.g. serve.num_replicas=2"
    )
    p.add_argument(
        "--monitor-concurrency",
        nargs="*",
        type=int,
        default=[16],
        help="clients for the drift monitor on/off comparison (none: skip it)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FABRIC_HOME", tempfile.mkdtemp(prefix="fabric-bench-home-"))
    import httpx

    root = Path(tempfile.mkdtemp(prefix="fabric-bench-serve-"))
    serve_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[tuple[str, str], str] = {}
    results: list[dict[str, Any]] = []
    monitored: list[dict[str, Any]] = []
    monitor_urls: dict[str, dict[str, str]] = {}
    monitors: dict[str, Any] = {}
    try:
        for name in args.models:
            folder = make_model(root / name, *MODELS[name])
            for side, flag in (("plain", "--_plain"), ("same", "--_bare")):
                if side in args.sides:
                    port = free_port()
                    extra = [str(root / "runs")] if side == "same" else []
                    procs.append(
                        subprocess.Popen([sys.executable, __file__, flag, str(folder), *extra, name, str(port)])
                    )
                    urls[(name, side)] = f"http://127.0.0.1:{port}"
            if "fabric" in args.sides:
                from fabric.serve import deploy

                result = deploy(config(folder, root / "runs", name, serve_port, args.serve_override))
                urls[(name, "fabric")] = result.url
                print(f"{name}: fabric at {result.url}, fast path {'on' if result.fast_path else 'off'}", flush=True)
                if args.monitor_concurrency:
                    # the actor first: a replica looks the monitor up by name when it starts
                    monitors[name] = start_monitor(MODELS[name][0], monitor_overrides(name))
                    on = config(
                        folder,
                        root / "runs",
                        name,
                        serve_port,
                        [*args.serve_override, *monitor_overrides(name)],
                        app=f"{name}-monitored",
                    )
                    monitor_urls[name] = {"off": result.url, "on": deploy(on).url}
        for name in args.models:
            for side in args.sides:
                wait_ready(urls[(name, side)])
            body = request_body(MODELS[name][0])
            path = f"/v2/models/{name}/infer"
            for clients in args.concurrency:
                runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
                for rep in range(args.repeat):
                    order = args.sides[rep % len(args.sides) :] + args.sides[: rep % len(args.sides)]
                    for side in order:
                        runs[side].append(measure(urls[(name, side)] + path, body, clients, args.duration))
                best = {side: sorted(r, key=lambda m: m["rps"])[len(r) // 2] for side, r in runs.items()}
                row: dict[str, Any] = {"model": name, "clients": clients, **{side: m for side, m in best.items()}}
                if "fabric" in args.sides:
                    stats = httpx.get(f"{urls[(name, 'fabric')]}/v2/models/{name}/stats", timeout=10).json()[
                        "model_stats"
                    ][0]
                    row["fabric_batch_stats"] = stats["batch_stats"]
                results.append(row)
                print(
                    f"  {name:5s} c={clients:<3d} "
                    + " | ".join(
                        f"{side} {m['rps']:6.0f} req/s p50 {m['p50_ms']:6.2f} p99 {m['p99_ms']:6.2f}"
                        for side, m in best.items()
                    ),
                    flush=True,
                )
        for name, murls in monitor_urls.items():
            wait_ready(murls["on"])
            monitored += compare_monitor(
                name, murls, args.monitor_concurrency, args.duration, args.repeat, monitors[name]
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        # the local Ray (and Serve with it) ends with this process

    print()
    for side in args.sides:
        print(f"- {side}: {SIDES[side]}")
    print()
    base = [s for s in ("plain", "same") if s in args.sides]
    head = [
        "model",
        "clients",
        *[f"{s} req/s" for s in args.sides],
        *[f"fabric/{b}" for b in base if "fabric" in args.sides],
    ]
    head += [f"{s} p50 / p99 ms" for s in args.sides]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for r in results:
        cells = [r["model"], str(r["clients"]), *[f"{r[s]['rps']:.0f}" for s in args.sides]]
        cells += [f"{r['fabric']['rps'] / r[b]['rps']:.2f}x" for b in base if "fabric" in args.sides]
        cells += [f"{r[s]['p50_ms']:.2f} / {r[s]['p99_ms']:.2f}" for s in args.sides]
        print("| " + " | ".join(cells) + " |")
    if monitored:
        print("\nThe drift monitor on vs off (fabric, named-column input, every row sent to the monitor actor):\n")
        print("| model | clients | monitor off req/s | monitor on req/s | on/off | off p50 / p99 ms | on p50 / p99 ms "
              "| rows at the monitor | dropped |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in monitored:
            off, on = r["off"], r["on"]
            print(
                f"| {r['model']} | {r['clients']} | {off['rps']:.0f} | {on['rps']:.0f} | {on['rps'] / off['rps']:.3f}x "
                f"| {off['p50_ms']:.2f} / {off['p99_ms']:.2f} | {on['p50_ms']:.2f} / {on['p99_ms']:.2f} "
                f"| {r['received']} | {r['dropped']} |"
            )
    errors = sum(r[s]["errors"] for r in results for s in args.sides)
    errors += sum(r[s]["errors"] for r in monitored for s in ("off", "on"))
    print(f"\nnon-200 answers: {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps({"servers": results, "monitor": monitored}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        url, clients, seconds, warmup = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
        payload = sys.stdin.buffer.read()
        if warmup > 0:
            generate_load(url, payload, clients, warmup)
        print(json.dumps(generate_load(url, payload, clients, seconds)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_bare":
        bare_server(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_plain":
        plain_server(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
