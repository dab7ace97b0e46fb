"""``GET /metrics``: Prometheus text format."""

from __future__ import annotations

from .worker import Worker


def prometheus(worker: Worker) -> str:
    lines = [
        "# HELP diffguide_queue_length Jobs waiting to run.",
        "# TYPE diffguide_queue_length gauge",
        f"diffguide_queue_length {worker.waiting()}",
        "# HELP diffguide_jobs Jobs in the store by state.",
        "# TYPE diffguide_jobs gauge",
    ]
    lines += [f'diffguide_jobs{{state="{s}"}} {n}' for s, n in worker.store.counts().items()]
    m = worker.metrics
    cache = worker.cache.describe()
    lines += [
        "# HELP diffguide_step_seconds Wall time of sampling steps.",
        "# TYPE diffguide_step_seconds summary",
        f"diffguide_step_seconds_sum {m.step_seconds_sum:.6f}",
        f"diffguide_step_seconds_count {m.step_count}",
        "# HELP diffguide_model_cache_bytes Bytes of the loaded models.",
        "# TYPE diffguide_model_cache_bytes gauge",
        f"diffguide_model_cache_bytes {cache['used_bytes']}",
        "# HELP diffguide_model_cache_budget_bytes The model cache's memory budget.",
        "# TYPE diffguide_model_cache_budget_bytes gauge",
        f"diffguide_model_cache_budget_bytes {cache['budget_bytes']}",
        "# HELP diffguide_models_loaded Models in the cache.",
        "# TYPE diffguide_models_loaded gauge",
        f"diffguide_models_loaded {len(cache['loaded'])}",
        "# HELP diffguide_model_loads_total Models loaded since start.",
        "# TYPE diffguide_model_loads_total counter",
        f"diffguide_model_loads_total {worker.cache.loads}",
        "# HELP diffguide_model_evictions_total Models evicted from the cache since start.",
        "# TYPE diffguide_model_evictions_total counter",
        f"diffguide_model_evictions_total {worker.cache.evictions}",
        "# HELP diffguide_callbacks_total Webhook calls by outcome.",
        "# TYPE diffguide_callbacks_total counter",
        f'diffguide_callbacks_total{{outcome="sent"}} {m.callbacks_sent}',
        f'diffguide_callbacks_total{{outcome="failed"}} {m.callbacks_failed}',
    ]
    return "\n".join(lines) + "\n"
