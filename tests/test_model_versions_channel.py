"""The versions channel (connectors/model_versions.py) on a real Redis server and a real Bytewax
run: versions come back in order and bit for bit, the source ends on every model's end marker,
and a fresh run's clear leaves nothing of an earlier one."""
from __future__ import annotations

import threading
import time

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main

from connectors.model_versions import (End, ModelVersionsSink, ModelVersionsSource, clear,
                                       decode, encode, stream_key)
from models.learner import Learner

PREFIX = "t-versions"


def publications(model: str, n: int) -> list:
    learner = Learner(model, learning_rate=0.3)
    out = []
    for v in range(n):
        learner.learn_one({"a": v * 0.1, "b": 1.0 / (v + 1)}, v % 2 == 0)
        out.append(learner.publish(v, v + (v % 3)))
    return out


def read_all(redis_url: str, models: set[str]) -> list:
    flow = Dataflow("versions")
    got: list = []
    op.output("out", op.input("in", flow, ModelVersionsSource(redis_url, PREFIX, frozenset(models))),
              TestingSink(got))
    run_main(flow)
    return got


def write(redis_url: str, items: list) -> None:
    part = ModelVersionsSink(redis_url, PREFIX).build("s", 0, 1)
    part.write_batch(items)
    part.close()


def test_versions_come_back_in_order_bit_for_bit_and_the_source_ends_on_the_markers(
        redis_url, redis_client):
    a, b = publications("ctr", 5), publications("churn_risk", 3)
    write(redis_url, a[:2] + b + [End("churn_risk")])
    write(redis_url, a[2:] + [End("ctr")])
    got = read_all(redis_url, {"ctr", "churn_risk"})
    assert got == a[:2] + b + a[2:]  # Weights compare by every field: floats survive JSON
    assert [w.last_version for w in got] == [w.last_version for w in a[:2] + b + a[2:]]
    for w in a:
        assert decode(encode(w)).predict_one({"a": 0.3, "b": 2.0}) == w.predict_one({"a": 0.3, "b": 2.0})


def test_the_reader_waits_for_versions_published_while_it_runs(redis_url, redis_client):
    items = publications("ctr", 4)

    def later():
        time.sleep(0.3)
        write(redis_url, items[:2])
        time.sleep(0.3)
        write(redis_url, items[2:] + [End("ctr")])

    t = threading.Thread(target=later)
    t.start()
    started = time.monotonic()
    got = read_all(redis_url, {"ctr"})
    t.join()
    assert got == items and time.monotonic() - started >= 0.5


def test_a_fresh_run_clears_what_an_earlier_run_left(redis_url, redis_client):
    write(redis_url, publications("ctr", 3))
    assert redis_client.xlen(stream_key(PREFIX)) == 3
    clear(redis_client, PREFIX)
    write(redis_url, [End("ctr")])
    assert read_all(redis_url, {"ctr"}) == []
