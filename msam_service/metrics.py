"""Service metrics kept in Redis (workers write, the api exports them at ``/metrics``).

Workers are separate processes (and machines); keeping counters and histogram buckets in Redis
lets one ``/metrics`` endpoint report them all without a push gateway.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

_COUNTERS = "msam:metrics:counters"
_HIST = "msam:metrics:hist:"
#: Seconds; covers a cached decoder pass on a GPU (ms) up to a slow CPU job (minutes).
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STAGES = ("queue", "model_load", "load", "preprocess", "encode", "decode", "prior", "boundary", "write", "total")


class RedisMetrics:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def incr(self, name: str, amount: int = 1) -> None:
        self.r.hincrby(_COUNTERS, name, amount)

    def observe(self, stage: str, seconds: float) -> None:
        key = _HIST + stage
        pipe = self.r.pipeline()
        for le in BUCKETS:
            if seconds <= le:
                pipe.hincrby(key, f"{le}", 1)
        pipe.hincrby(key, "+Inf", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
        pipe.execute()

    def observe_all(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.observe(stage, seconds)

    def counters(self) -> dict[str, int]:
        raw = self.r.hgetall(_COUNTERS)
        return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def histogram(self, stage: str) -> tuple[list[tuple[str, float]], float]:
        raw = {k.decode(): float(v) for k, v in self.r.hgetall(_HIST + stage).items()}  # type: ignore[union-attr]
        buckets = [(str(le), raw.get(f"{le}", 0.0)) for le in BUCKETS]
        buckets.append(("+Inf", raw.get("+Inf", 0.0)))
        return buckets, raw.get("sum", 0.0)


class RedisCollector:
    """A prometheus_client collector that reads :class:`RedisMetrics` and queue state."""

    def __init__(self, metrics: RedisMetrics, gauges: GaugeSource) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        try:
            counters = self.metrics.counters()
            jobs = CounterMetricFamily("msam_jobs_finished", "Jobs that reached a final status",
                                       labels=["status"])
            for status in ("succeeded", "failed", "canceled"):
                jobs.add_metric([status], counters.get(f"jobs_{status}", 0))
            yield jobs
            submitted = CounterMetricFamily("msam_jobs_submitted", "Jobs accepted by the API")
            submitted.add_metric([], counters.get("jobs_submitted", 0))
            yield submitted
            cache = CounterMetricFamily("msam_embedding_cache", "Embedding cache lookups",
                                        labels=["result"])
            cache.add_metric(["hit"], counters.get("cache_hits", 0))
            cache.add_metric(["miss"], counters.get("cache_misses", 0))
            yield cache
            interactions = CounterMetricFamily("msam_interactions", "Session interactions by outcome "
                                               "(submitted, done, failed, resent after a lost worker)",
                                               labels=["outcome"])
            for outcome in ("submitted", "done", "failed", "resent"):
                interactions.add_metric([outcome], counters.get(f"interactions_{outcome}", 0))
            yield interactions
            redeliveries = CounterMetricFamily("msam_job_redeliveries", "Jobs delivered again after a lost worker")
            redeliveries.add_metric([], counters.get("redeliveries", 0))
            yield redeliveries
            current = GaugeMetricFamily("msam_jobs", "Jobs by current status", labels=["status"])
            for status, n in self.gauges.job_counts().items():
                current.add_metric([status], n)
            yield current
            depth = GaugeMetricFamily("msam_queue_depth", "Messages waiting in the Celery queue")
            depth.add_metric([], self.gauges.queue_depth())
            yield depth
            cache_bytes = GaugeMetricFamily("msam_embedding_cache_bytes", "Bytes held by the embedding cache")
            cache_bytes.add_metric([], self.gauges.cache_bytes())
            yield cache_bytes
            hist = HistogramMetricFamily("msam_stage_seconds", "Job stage latency", labels=["stage"])
            for stage in STAGES:
                buckets, total = self.metrics.histogram(stage)
                hist.add_metric([stage], buckets, total)
            yield hist
        except redis.RedisError:
            up = GaugeMetricFamily("msam_redis_up", "Redis reachable from the API")
            up.add_metric([], 0)
            yield up


class GaugeSource:
    """Current values read on scrape."""

    def __init__(self, r: redis.Redis, queue: str) -> None:
        self.r = r
        self.queue = queue

    def job_counts(self) -> dict[str, int]:
        return {"queued": int(self.r.zcard("msam:queued")), "running": int(self.r.scard("msam:running"))}  # type: ignore[arg-type]

    def queue_depth(self) -> int:
        return int(self.r.llen(self.queue))  # type: ignore[arg-type]

    def cache_bytes(self) -> int:
        return int(self.r.get("msam:emb:bytes") or 0)  # type: ignore[arg-type]
