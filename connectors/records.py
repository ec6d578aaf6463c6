"""The raw record every source yields: same attribute names as Bytewax's KafkaSourceMessage, so
the decode step treats Kafka, files and the synthetic generator alike."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RawRecord:
    value: bytes
    key: bytes | None = None
    partition: int = 0
    offset: int = 0
    topic: str = ""
    arrival_ms: int = 0  # when the record reached the system (latency figures only)
    ingest_ms: int = 0  # when the producer sent it (the synthetic generator's send time), 0 unknown
