"""Reading back what the trackers wrote, each with its own package's reader (W&B's offline file by hand: its
Python reader is gone from the package, the record format is a LevelDB log of protobuf records)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(store: Path, experiment: str):
    """The MLflow client of a file store, and the runs of one experiment in it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=Path(store).resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def mlflow_history(store: Path, experiment: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the experiment's only run: key -> [(step, value)] in step order."""
    client, runs = mlflow_runs(store, experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run_id = runs[0].info.run_id
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in runs[0].data.metrics}


def _wandb_records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B offline run file"
    pos, block, pending = 7, 32768, b""  # a 7-byte file header, then 32 KiB blocks of records
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a record header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield pending
            pending = b""


def wandb_history(wandb_dir: Path) -> tuple[set[str], list[dict[str, float]]]:
    """The run ids and the logged rows (without W&B's own _step, _runtime, _timestamp) of every offline run
    folder under ``wandb_dir``, oldest first."""
    from wandb.proto import wandb_internal_pb2

    ids, rows = set(), []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return ids, rows
