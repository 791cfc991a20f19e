"""Flags and helpers shared by the launch scripts (no library logic here)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

from absl import app, flags, logging

from jaxroute import accounting, synthetic, trace, traceset
from jaxroute.errors import InputError

_TRACES = flags.DEFINE_string("traces", None, "Trace-set folder (manifest.json + trees.jsonl).")
_SYNTHETIC = flags.DEFINE_integer(
    "synthetic", 0, "If > 0 and --traces is unset: use a SYNTHETIC trace set of this many problems "
    "(jaxroute.synthetic; for demos and tests, not real LLM data).")
_SYNTHETIC_K = flags.DEFINE_integer("synthetic_models", 2, "Models in the synthetic set (2 or 3).")
_SEED_DATA = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic trace set.")
_COST = flags.DEFINE_enum("cost_model", "flops", list(accounting.COST_MODELS),
                          "Cost unit: FLOPs in 1e12, or US cents from token counts and prices.")


def load_trees() -> tuple[trace.Manifest, trace.PackedTrees, str]:
    """(manifest, packed trees, description) from --traces or --synthetic."""
    if _TRACES.value:
        manifest, problems = traceset.load_trace_set(_TRACES.value)
        return manifest, trace.pack(manifest, problems, _COST.value), _TRACES.value
    if _SYNTHETIC.value > 0:
        if _SYNTHETIC_K.value == 3:
            cfg = synthetic.three_model_config(num_problems=_SYNTHETIC.value, seed=_SEED_DATA.value)
        else:
            cfg = synthetic.SyntheticConfig(num_problems=_SYNTHETIC.value, seed=_SEED_DATA.value)
        manifest, packed = synthetic.generate_packed(cfg, _COST.value)
        return manifest, packed, f"SYNTHETIC ({_SYNTHETIC.value} problems, seed {_SEED_DATA.value})"
    raise flags.ValidationError("give --traces=FOLDER or --synthetic=N")


def traces_folder() -> str:
    return _TRACES.value


def cost_model() -> str:
    return _COST.value


def quiet() -> None:
    """Library logs at WARNING and up only — orbax's per-save INFO lines, JAX's backend probing
    and orbax's restore warnings stay out of the output — unless `--verbosity` (or `-v`) was
    given. `run` calls it for every entry point."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"orbax\..*")


def _libc():
    """glibc's C library, or None elsewhere (musl, macOS): the memory calls below are glibc's."""

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's <malloc.h>


def large_blocks_outside_the_heap(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations ≥ `threshold_bytes` by mmap, so that freeing them returns the memory
    to the OS at once (decision 81). glibc's default threshold adapts upwards to 32 MiB after
    the first large free, after which numpy and XLA host buffers of a few MB land in the heap
    and stay resident long after they are freed. Returns whether it took effect."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


def release_memory() -> None:
    """Between the stages of a long job (decision 81): drop JAX's compiled executables (a
    stage's shapes are not the next one's; recompiling costs seconds, keeping them hundreds of MB),
    collect garbage, and hand the heap's free pages back to the OS (without `malloc_trim` a
    fragmented heap keeps its peak size)."""

    import jax

    jax.clear_caches()
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def compilation_cache(path: str | Path) -> None:
    """JAX's persistent compilation cache in `path` (decision 96): an executable dropped by
    `release_memory` — or compiled by an earlier run — is read back from disk instead of being
    compiled again. Memory stays bounded (the executables live on disk, not in the process)."""
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class StageClock:
    """Per stage of a long job: wall seconds, CPU seconds (user + system of this process and of
    its finished child processes — the answer checkers; a child still running at the mark,
    such as a vLLM engine core, is not counted, `/usr/bin/time` is) and JAX compile seconds
    (tracing, lowering and XLA compilation, from `jax.monitoring`'s duration events)."""

    def __init__(self):
        from jax import monitoring

        self.compile = 0.0
        monitoring.register_event_duration_secs_listener(self._on_event)
        self.wall, self.cpu, self.compiled = {}, {}, {}
        self._last = self._now()

    def _on_event(self, name: str, seconds: float, **_) -> None:
        if name.startswith("/jax/core/compile/"):
            self.compile += seconds

    def _now(self) -> tuple[float, float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return (time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                self.compile)

    def mark(self, stage: str) -> float:
        """Close `stage` (everything since the previous mark); returns its wall seconds."""
        now = self._now()
        self.wall[stage], self.cpu[stage], self.compiled[stage] = (
            round(a - b, 1) for a, b in zip(now, self._last, strict=True))
        self._last = now
        return self.wall[stage]

    def totals(self) -> dict[str, dict[str, float]]:
        return {"seconds": {**self.wall, "total": round(sum(self.wall.values()), 1)},
                "cpu_seconds": {**self.cpu, "total": round(sum(self.cpu.values()), 1)},
                "compile_seconds": {**self.compiled,
                                    "total": round(sum(self.compiled.values()), 1)}}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def user_errors() -> tuple[type[BaseException], ...]:
    """Failures of input or environment that a user fixes, printed as one line: `InputError`
    (bad flags, configs, files, records — trace, dataset, router errors are kinds of it), fatal
    backend and worker failures, missing or locked files. Any other exception — a bug — keeps
    its traceback."""
    from generation.backends.retry import FatalBackendError
    from generation.traces.answers import WorkerError

    return (InputError, FatalBackendError, WorkerError, flags.ValidationError,
            FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            IsADirectoryError)


# Errors of a full disk (or quota, or a file-size limit): one line, and the run resumes.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(e: BaseException) -> bool:
    """A write that found no room: an `OSError` with a disk-full errno, or a native library's
    error (orbax/tensorstore, safetensors) that reports one in its message."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return True
    text = str(e)
    return any(os.strerror(n) in text for n in DISK_FULL)


def _first_line(e: BaseException) -> str:
    lines = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()
    return lines[0][:200] if lines else type(e).__name__


def run(main) -> None:
    """`absl.app.run(main)`, quiet (`quiet`), with bad input and fatal backend failures reported
    as one line (`error: …`, exit 2) and Ctrl-C as one line (exit 130); any other exception (a
    bug) keeps its traceback."""

    def wrapped(argv):
        quiet()
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted: finished work is saved (re-run the same command to "
                             "resume)\n")
            sys.exit(130)
        except user_errors() as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 — a full disk, whoever's write found it
            if not disk_full(e):
                raise
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            sys.stderr.write(f"error: no room on the disk{where} ({_first_line(e)}): free space "
                             "and re-run the same command; finished work is kept and it "
                             "resumes\n")
            sys.exit(2)

    app.run(wrapped)


def check_flags(**rules) -> None:
    """Validate flags before any work starts (absl reports a failure as one line naming the
    flag): `name=(predicate, "what it must be")`, the predicate skipped for an unset flag."""
    for name, (pred, what) in rules.items():
        flags.register_validator(name, lambda v, p=pred: v is None or p(v),
                                 message=f"--{name} must be {what}")


def define_guarantee_flags():
    """--guarantee and --delta (decision 88) for a launcher; returns a function giving δ, or
    None for the marginal guarantee."""
    kind = flags.DEFINE_enum(
        "guarantee", "marginal", ["marginal", "pac"],
        "marginal: expected miscoverage ≤ α over calibration draws (conformal risk control); "
        "pac: miscoverage ≤ α with probability ≥ 1 − δ (Learn then Test).")
    delta = flags.DEFINE_float("delta", 0.1, "With --guarantee=pac: the allowed probability that "
                               "the calibrated knob misses more than α.")
    check_flags(delta=(probability, "in (0, 1)"))
    return lambda: None if kind.value == "marginal" else delta.value


def positive(v) -> bool:
    return v >= 1


def probability(v) -> bool:
    return 0.0 < v < 1.0


def widths(v) -> bool:
    try:
        return len(v) > 0 and all(int(x) >= 1 for x in v)
    except ValueError:
        return False
