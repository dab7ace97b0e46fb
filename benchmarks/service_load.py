"""Load test of ``diffguide serve`` on loopback: N requests from C concurrent clients.

Starts ``diffguide serve`` (real uvicorn, bundled tiny-sd, one torch thread per job) unless
``--url`` names a running one, sends ``--requests`` jobs from ``--clients`` threads (each
``POST /v1/jobs?wait=true``, retrying after a 429's Retry-After), then checks that nothing was
lost or duplicated (every request has exactly one job, the store holds exactly those jobs) and
that every job's latents are bit-identical to its solo run (the library on the same model, one
thread). Prints p50 / p95 latency and throughput; ``--json FILE`` writes the report.

    python benchmarks/service_load.py [--requests 100] [--clients 20] [--steps 4] [--json out.json]
    python benchmarks/service_load.py --ray 2      # the same on 2 Ray Serve replicas
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [f"a handwritten digit {d}" for d in range(10)] + ["a photo of a sneaker", "a photo of a dress"]


@dataclass
class LoadReport:
    requests: int
    clients: int
    steps: int
    wall_s: float
    throughput_rps: float
    p50_s: float
    p95_s: float
    max_s: float
    retries_429: int
    succeeded: int
    lost: int
    duplicated: int
    mismatches: int
    failures: list[str] = field(default_factory=list)


def body(i: int, steps: int) -> dict[str, Any]:
    """Request i: a prompt of the bundled model's, seed i, CFG + PAG every third request."""
    guidance: list[dict[str, Any]] = [{"method": "cfg", "scale": 4.0}]
    if i % 3 == 0:
        guidance.append({"method": "pag", "scale": 1.5})
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "guidance": guidance}


def send(http: httpx.Client, payload: dict[str, Any]) -> tuple[dict[str, Any], float, int]:
    """POST with wait; (job, latency from the first try, 429 retries)."""
    start, retries = time.perf_counter(), 0
    while True:
        r = http.post("/v1/jobs", params={"wait": "true"}, json=payload)
        if r.status_code != 429:
            r.raise_for_status()
            return r.json(), time.perf_counter() - start, retries
        retries += 1
        time.sleep(float(r.headers.get("retry-after", "1")))


def run_load(
    url: str, requests: int, clients: int, steps: int, headers: dict[str, str] | None = None
) -> tuple[LoadReport, dict[int, str]]:
    """Send the requests; the report (without the solo check) and request index -> job id."""
    jobs: dict[int, dict[str, Any]] = {}
    latencies: list[float] = []
    retries = [0]
    lock = threading.Lock()
    todo = list(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                job, latency, tries = send(http, body(i, steps))
                with lock:
                    jobs[i] = job
                    latencies.append(latency)
                    retries[0] += tries

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        stored = [j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}).json()]
    ids = [jobs[i]["id"] for i in sorted(jobs)]
    ordered = sorted(latencies)
    report = LoadReport(
        requests=requests,
        clients=clients,
        steps=steps,
        wall_s=round(wall, 3),
        throughput_rps=round(requests / wall, 3),
        p50_s=round(statistics.median(ordered), 3),
        p95_s=round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 3),
        max_s=round(ordered[-1], 3),
        retries_429=retries[0],
        succeeded=sum(j["state"] == "succeeded" for j in jobs.values()),
        lost=requests - len(set(ids) & set(stored)),
        duplicated=len(stored) - len(set(stored)) + max(0, len(stored) - requests),
        mismatches=0,
        failures=[
            f"{j['id']}: {j['state']} {j['error']}" for j in jobs.values() if j["state"] != "succeeded"
        ],
    )
    return report, {i: j["id"] for i, j in jobs.items()}


def check_solo(
    url: str, ids: dict[int, str], steps: int, headers: dict[str, str] | None = None, pipe: Any = None
) -> list[int]:
    """Requests whose latents differ from the solo library run (same model, one thread)."""
    import torch
    from safetensors.torch import load

    from diffguide import GuidedPipeline
    from diffguide.service.schema import JobRequest

    torch.set_num_threads(1)
    pipe = pipe or GuidedPipeline.from_pretrained(device="cpu")
    bad = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for i, job_id in sorted(ids.items()):
            served = load(http.get(f"/v1/jobs/{job_id}/latents").content)["latents"]
            solo = pipe.generate(JobRequest(**body(i, steps)).to_config(), decode=False).latents
            if not torch.equal(served, solo):
                bad.append(i)
    return bad


def start_server(data_dir: Path, port: int, queue_size: int, replicas: int = 0) -> subprocess.Popen[bytes]:
    """``diffguide serve`` on loopback (``replicas`` > 0: ``--ray --replicas N``), once it answers."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "diffguide.cli.main", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--threads", "1", "--device", "cpu", "--queue-size", str(queue_size), "--preview-every", "0"]  # fmt: skip
    if replicas:
        cmd += ["--ray", "--replicas", str(replicas)]
    log = data_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + (1200 if replicas else 120)  # Ray and its replicas start slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit("diffguide serve exited: " + " | ".join(tail))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("diffguide serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--queue-size", type=int, default=16, help="the server's queue (429s are retried)")
    ap.add_argument("--ray", type=int, default=0, metavar="REPLICAS", help="serve with --ray --replicas N")
    ap.add_argument("--url", help="a running diffguide serve (default: start one on loopback)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()
    import tempfile

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc = start_server(Path(tmp), args.port, args.queue_size, args.ray)
            url = f"http://127.0.0.1:{args.port}"
        try:
            report, ids = run_load(url, args.requests, args.clients, args.steps)
            report.mismatches = len(check_solo(url, ids, args.steps))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if report.lost or report.duplicated or report.mismatches or report.failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
