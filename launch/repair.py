"""Repair a damaged trace set: drop a torn last line, invalid records and duplicate problem ids.

    python -m launch.repair --traces=traces/gsm8k

Keeps every record that parses and validates, keeps the old file as trees.jsonl.bak (never
overwriting an earlier backup) and prints what was dropped (`jaxroute.traceset.repair`). When most
records fail the same check (an edited manifest, not damage) it refuses and changes nothing;
--force drops them anyway.
"""

from __future__ import annotations

from absl import flags

from jaxroute import traceset
from jaxroute.durable import exclusive
from launch import common

_FORCE = flags.DEFINE_bool("force", False, "Drop records even when most fail the same check.")
flags.mark_flags_as_required(["traces"])


def main(argv):
    del argv
    with exclusive(common.traces_folder()):
        report = traceset.repair(common.traces_folder(), force=_FORCE.value)
    print(f"kept {report['kept']} problems; dropped a torn tail of {report['torn_bytes']} bytes, "
          f"{len(report['invalid'])} invalid records, {len(report['duplicates'])} duplicates; "
          f"the old file is {report['backup']}")
    for line in report["invalid"][:20] + report["duplicates"][:20]:
        print("  " + line)


if __name__ == "__main__":
    common.run(main)
