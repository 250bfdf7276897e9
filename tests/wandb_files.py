"""Read back what an offline W&B run wrote to disk (test helper).

An offline run stores its records in ``run-<id>.wandb``: a 7-byte header (``:W&B``, magic, version)
followed by 32 KiB blocks of LevelDB-log records (crc32c: 4 bytes, length: 2, type: 1, data), each
record a serialised ``wandb_internal_pb2.Record``. Only what the suite logs is decoded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        chunks.append(payload)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_run(run_dir: Path) -> dict:
    """{'config': {...}, 'summary': {...}, 'history': [...], 'artifacts': [names], 'exit_code': int}"""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {"config": {}, "summary": {}, "history": [], "artifacts": [], "exit_code": None}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "artifact":
            out["artifacts"].append(record.artifact.name)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
