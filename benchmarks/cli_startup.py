"""How long the CLI takes to answer `--help`, against a bare Python start-up measured in the same run.

    python benchmarks/cli_startup.py [--repeats 15] [--json f]

Target: `fedlora --help` median under 0.5 s. The CLI defers torch, transformers, peft and opacus to the
commands that need them, so help and argument errors never pay for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "fedlora --help": [str(BIN / "fedlora"), "--help"],
    "fedlora train-client --help": [str(BIN / "fedlora"), "train-client", "--help"],
    "fedlora aggregate --help": [str(BIN / "fedlora"), "aggregate", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - started)
    bare = statistics.median(times["python -c pass"])
    print(f"# CLI start-up, {args.repeats} repeats, {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
          f"{os.cpu_count()} cpus, python {platform.python_version()}")
    print("| command | median s | min s | x bare python |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} | {statistics.median(values) / bare:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seconds": times}, indent=2))


if __name__ == "__main__":
    main()
