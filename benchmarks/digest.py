"""Digest throughput: sha256 (fedlora's tensor digests until xxh128) against xxh3-128 and BLAKE3, and what
checking one client update costs the coordinator.

    python benchmarks/digest.py [--repeats 7] [--dir /tmp/fedlora-bench-digest] [--json f]

Two measurements, each the median of ``--repeats``, side by side in one process:

    one tensor     a 67 MB float32 tensor (4096 x 4096) hashed where it lies (a memoryview of its buffer, no
                   copy), by each library alone and through fedlora's own tensor_digest; BLAKE3 only if the
                   ``blake3`` package is importable (fedlora does not depend on it), on one thread and on all
    one update     a LLaMA-7B-shaped client update (256 LoRA tensors, 67 MB, as benchmarks/aggregate.py writes
                   them) read from the page cache: read only (safetensors load_file); read then hash every
                   tensor with sha256 (what fedlora did before xxh128); storage.load_verified with xxh128
                   digests (each tensor hashed as it is read) and with the sha256 digests of an old manifest

Throughput is MB (10^6 bytes) per second of tensor data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import tensor_names  # the LLaMA-7B-shaped LoRA tensors, as benchmarks/aggregate.py writes them


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: page cache, first-call imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def one_tensor(repeats: int) -> list[dict]:
    import torch
    import xxhash

    from fedlora_cli import storage

    t = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    ways: dict[str, Callable[[], object]] = {
        "sha256 (hashlib)": lambda: hashlib.sha256(view).hexdigest(),
        "xxh3-128 (xxhash)": lambda: xxhash.xxh3_128(view).hexdigest(),
        "fedlora tensor_digest, sha256": lambda: storage.tensor_digest(t, "sha256"),
        "fedlora tensor_digest, xxh128": lambda: storage.tensor_digest(t),
    }
    try:
        import blake3

        ways["BLAKE3 (blake3), 1 thread"] = lambda: blake3.blake3(view, max_threads=1).hexdigest()
        ways["BLAKE3 (blake3), all threads"] = lambda: blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
    except ImportError:
        print("blake3 is not importable: BLAKE3 not measured", file=sys.stderr)
    rows = []
    for name, fn in ways.items():
        seconds = timed(fn, repeats)
        rows.append({"way": name, "ms": seconds * 1000, "mb_per_s": view.nbytes / seconds / 1e6})
    return rows


def one_update(root: Path, repeats: int) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from fedlora_cli import storage

    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in tensor_names()}
    path = root / storage.UPDATE_TENSORS
    storage.save_tensors(path, tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    new = {name: storage.tensor_digest(t) for name, t in tensors.items()}
    old = {name: storage.tensor_digest(t, "sha256").split(":", 1)[1] for name, t in tensors.items()}  # bare hex

    def read_then_sha256() -> None:
        loaded = load_file(str(path))
        for t in loaded.values():
            storage.tensor_digest(t, "sha256")

    ways: dict[str, Callable[[], object]] = {
        "read only (load_file)": lambda: load_file(str(path)),
        "read, then sha256 each tensor (before)": read_then_sha256,
        "load_verified, xxh128 digests (now)": lambda: storage.load_verified(path, new, "update"),
        "load_verified, old sha256 digests": lambda: storage.load_verified(path, old, "update"),
    }
    rows = []
    for name, fn in ways.items():
        seconds = timed(fn, repeats)
        rows.append({"way": name, "ms": seconds * 1000, "mb_per_s": nbytes / seconds / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default="/tmp/fedlora-bench-digest")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        tensor_rows = one_tensor(args.repeats)
        update_rows = one_update(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"# Digests, median of {args.repeats}, {time.strftime('%Y-%m-%d')}, {cpu_name()}, "
          f"python {platform.python_version()}")
    for title, rows in (("One 67 MB float32 tensor", tensor_rows), ("One 67 MB client update (256 tensors)",
                                                                    update_rows)):
        print(f"\n{title}\n\n| way | ms | MB/s |\n|---|---|---|")
        for r in rows:
            print(f"| {r['way']} | {r['ms']:.1f} | {r['mb_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
                                               "repeats": args.repeats, "tensor": tensor_rows,
                                               "update": update_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
