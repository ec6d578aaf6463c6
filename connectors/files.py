"""JSON-lines files: a replay source (one partition per file, resumable by byte offset) and the
embedded mode's sink for dead letters, actions and alerts."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.records import RawRecord
from surgeflow.stats import STATS


class _FilePartition(StatefulSourcePartition[RawRecord, int]):
    def __init__(self, path: Path, index: int, offset: int | None, batch_size: int):
        self.file = path.open("rb")
        self.file.seek(offset or 0)
        self.index = index
        self.batch_size = batch_size
        self.name = str(path)

    def next_batch(self) -> list[RawRecord]:
        batch = []
        now_ms = int(time.time() * 1000)
        for _ in range(self.batch_size):
            offset = self.file.tell()
            line = self.file.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if line:
                batch.append(RawRecord(line, None, self.index, offset, self.name, now_ms))
        if not batch:
            raise StopIteration()
        return batch

    def snapshot(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class JsonLinesSource(FixedPartitionedSource[RawRecord, int]):
    """Replays JSON-lines files; each line is one raw event (bad lines become dead letters)."""

    def __init__(self, paths: Iterable[str | Path], batch_size: int = 1000):
        self.paths = sorted(Path(p) for p in paths)
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"event files not found: {', '.join(missing)}")
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [str(p) for p in self.paths]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None):
        index = self.list_parts().index(for_part)
        return _FilePartition(Path(for_part), index, resume_state, self.batch_size)


_FILE_LOCKS: dict[Path, threading.Lock] = {}


def file_lock(path: Path) -> threading.Lock:
    """The lock of a JSON-lines file of this process: writers append under it, an erasure
    rewrites the file under it (privacy/erasure.py)."""
    return _FILE_LOCKS.setdefault(Path(path).resolve(), threading.Lock())


def drop_lines(path: Path, gone: Callable[[bytes], bool]) -> int:
    """Rewrite a JSON-lines file in place without the lines ``gone`` picks, under the writers'
    lock (erasure, retention); returns how many went (0 for a missing file)."""
    with file_lock(path):
        try:
            with open(path, "r+b") as f:
                lines = f.readlines()
                keep = [line for line in lines if not gone(line)]
                if len(keep) != len(lines):
                    f.seek(0)
                    f.writelines(keep)
                    f.truncate()
                return len(lines) - len(keep)
        except (FileNotFoundError, IsADirectoryError):
            return 0


class _JsonLinesPartition(StatelessSinkPartition):
    def __init__(self, path: Path, encode: Callable[[object], bytes], observe: str | None):
        self.path = path
        self.encode = encode
        self.observe = observe
        self.lock = file_lock(path)

    def write_batch(self, items: list) -> None:
        lines = [self.encode(record) + b"\n" for batch in items for record in batch]
        if lines:
            with self.lock, self.path.open("ab") as f:
                f.write(b"".join(lines))
            if self.observe:
                observe_outputs(self.observe, items)


class JsonLinesSink(DynamicSink):
    """Appends records to one file, shared by all workers of the process. Items are lists."""

    def __init__(self, path: Path, encode: Callable[[object], bytes], observe: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.encode = encode
        self.observe = observe  # latency sample name, from records' "_arrival_ms"

    def build(self, step_id: str, worker_index: int, worker_count: int):
        return _JsonLinesPartition(self.path, self.encode, self.observe)


def arrivals(items: list, key: str = "_arrival_ms") -> list[int]:
    return [r[key] for batch in items for r in batch if isinstance(r, dict) and r.get(key)]


def observe_outputs(name: str, items: list) -> None:
    """Latency samples of records written: ``name`` from their arrival; a trigger timer's action
    gives ``timer_lateness_ms`` instead, from the moment the watermark passed its due time."""
    STATS.observe_since(name, arrivals(items))
    STATS.observe_since("timer_lateness_ms", arrivals(items, "_timer_ms"))
