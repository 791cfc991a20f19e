"""Durable files: atomic writes with the umask's permissions, one writer per folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxroute import durable

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        durable.atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        durable.atomic_write_text(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_folder_has_one_writer_and_the_refusal_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxroute import durable\n"
         f"with durable.exclusive({str(tmp_path)!r}):\n"
         "    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(durable.FolderInUse, match=f"in use by process {holder.pid}"):
            with durable.exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with durable.exclusive(tmp_path):  # the lock died with its process
        pass
