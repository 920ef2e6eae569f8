"""Run every benchmark: ``python -m benchmarks [--quick] [--device cuda] [topic ...]``.

Each topic is a module ``benchmarks/<topic>.py`` with a ``main()``; it runs in its own
process and writes its tables and plots to ``benchmarks/results/``. ``--device`` goes to
the topics that take one (those whose source defines a ``--device`` option).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_TOPICS = {"__init__", "__main__", "common"}


def topics() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_TOPICS)


def takes_device(topic: str) -> bool:
    return '"--device"' in (HERE / f"{topic}.py").read_text()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks (all, or the topics named); results go to benchmarks/results/.",
        epilog="Examples: python -m benchmarks --quick; python -m benchmarks core_speed; "
        "python -m benchmarks.core_speed --help (a topic's own options).",
    )
    parser.add_argument("topics", nargs="*", help=f"any of: {', '.join(topics())}")
    parser.add_argument("--quick", action="store_true", help="small runs (a few minutes in all)")
    parser.add_argument("--device", default="cpu", help="device for the topics that take one (e.g. cuda)")
    args = parser.parse_args()
    chosen = args.topics or topics()
    unknown = sorted(set(chosen) - set(topics()))
    if unknown:
        parser.error(f"unknown topic(s) {unknown}; choose from {topics()}")
    failed = []
    for index, topic in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] benchmarks.{topic}", flush=True)
        start = time.perf_counter()
        command = [sys.executable, "-m", f"benchmarks.{topic}"] + (["--quick"] if args.quick else [])
        if args.device != "cpu":
            if not takes_device(topic):
                print(f"    skipped: does not take --device {args.device}", flush=True)
                continue
            command += ["--device", args.device]
        result = subprocess.run(command, cwd=HERE.parent, stdout=subprocess.DEVNULL, check=False)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"    {status} in {time.perf_counter() - start:.0f} s", flush=True)
        if result.returncode:
            failed.append(topic)
    print(f"results in {HERE / 'results'}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
