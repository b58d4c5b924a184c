"""One `/metrics` page for all replicas: each replica's Prometheus text, every sample labelled with its replica.

Per replica, not aggregated: summing counters across replicas is Prometheus's job (`sum without (replica)`), and
a replica restarted by Ray starts its counters at zero, which `rate()` handles per series but a pre-summed
counter would hide. Each family appears once (its HELP and TYPE), its samples from every replica after it."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Merged:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_replica_metrics(pages: dict[str, str]) -> bytes:
    """`pages`: replica id -> that replica's `/metrics` text (format 0.0.4). Returns one page in the same format
    whose samples carry `replica="<id>"` as well as their own labels, replicas in sorted order."""
    families: dict[str, Metric] = {}
    for replica in sorted(pages):
        for family in text_string_to_metric_families(pages[replica]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.samples.append(Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp,
                                             s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)
