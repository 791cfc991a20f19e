"""Repair a damaged trace set: drop a torn last line, invalid records and duplicate problem ids.

    python -m launch.repair --traces=traces/gsm8k

Keeps the old file as trees.jsonl.bak and prints what was dropped (`jaxroute.trace.repair`).
"""

from __future__ import annotations

from absl import flags

from jaxroute import trace
from jaxroute.durable import exclusive
from launch import common

flags.mark_flags_as_required(["traces"])


def main(argv):
    del argv
    with exclusive(common.traces_folder()):
        report = trace.repair(common.traces_folder())
    print(f"kept {report['kept']} problems; dropped a torn tail of {report['torn_bytes']} bytes, "
          f"{len(report['invalid'])} invalid records, {len(report['duplicates'])} duplicates")
    for line in report["invalid"][:20] + report["duplicates"][:20]:
        print("  " + line)


if __name__ == "__main__":
    common.run(main)
