"""benchmarks/service_load.py, bounded: concurrent clients against a real uvicorn on loopback with a
small queue (429s retried); nothing lost or duplicated, every result equal to its solo run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from service_support import live_server

from diffguide.service.config import ServiceConfig
from diffguide.service.models import ModelCache, find_models

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "service_load.py"


def load_script():
    spec = importlib.util.spec_from_file_location("service_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bounded_load_loses_nothing_and_equals_solo_runs(tmp_path):
    bench = load_script()
    cache = ModelCache(find_models((), True), 4096.0)
    config = ServiceConfig(tmp_path, threads=1, queue_size=2, preview_every=0)
    with live_server(config, cache) as url:
        report, ids = bench.run_load(url, requests=12, clients=6, steps=2)
        assert bench.check_solo(url, ids, 2, pipe=cache.get("tiny-sd")) == []
    assert report.succeeded == 12 and report.failures == []
    assert (report.lost, report.duplicated) == (0, 0)
    assert len(set(ids.values())) == 12 and sorted(ids) == list(range(12))
    assert report.retries_429 > 0  # 6 clients on a queue of 2: some were refused and retried
    assert 0 < report.p50_s <= report.p95_s <= report.max_s
