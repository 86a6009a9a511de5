"""Result records: each run writes its record atomically to ``RUN_DIR/record.json``; the store ingests them.

Jobs on a cluster never write the head node's SQLite file: hundreds of jobs on a shared filesystem would fight
over its lock (and SQLite's locking on network filesystems is unreliable). Each job rewrites its own small JSON
record (rename-into-place) at every status change; ``clipkd grid plan/status/submit`` ingest them into the store,
idempotently. With a server database (``--db postgresql+psycopg://…``) jobs also write the store directly.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from results.bits import pack, unpack
from results.store import Store, now

RECORD = "record.json"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except FileNotFoundError:
        return None


def write_record(run_dir: Path, run: dict[str, Any], metrics=None, curves=None, items=None) -> dict[str, Any]:
    """Merge ``run`` (and, if given, replace metrics and per-item bits per benchmark / all curves) into the record;
    atomic."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = read_record(run_dir) or {"run": {}, "metrics": {}, "curves": []}
    record["run"] = {**record["run"], **run, "updated_at": now()}
    record["metrics"].update(metrics or {})
    record.setdefault("items", {}).update({
        benchmark: {metric: {"count": len(b), "bits": base64.b64encode(pack(b)).decode()} for metric, b in bits.items()}
        for benchmark, bits in (items or {}).items()})
    if curves is not None:
        record["curves"] = [list(point) for point in curves]
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{RECORD}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / RECORD)
    return record


def ingest(store: Store, run_dirs: Iterable[Path]) -> int:
    """Copy records newer than the store's copy into the store; returns how many were taken."""
    taken = 0
    for run_dir in run_dirs:
        record = read_record(run_dir)
        if record is None:
            continue
        stored = store.get_run(record["run"]["id"])
        if stored and stored["updated_at"] >= record["run"]["updated_at"]:
            continue
        items = {benchmark: {metric: unpack(base64.b64decode(entry["bits"]), entry["count"])
                             for metric, entry in bits.items()} for benchmark, bits in record.get("items", {}).items()}
        store.put_run(record["run"], metrics=record["metrics"], curves=[tuple(p) for p in record["curves"]],
                      items=items)
        taken += 1
    return taken
