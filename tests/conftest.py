import atexit
import os
import shutil
import tempfile

# One persistent XLA cache for the whole run, shared with the launchers the tests start as
# subprocesses: the same computation built by another test (or process) is loaded, not
# recompiled. Per run, so nothing carries over between runs.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxroute-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Catch silent broadcasting bugs in the kernels (as rlax's tests do).
jax.config.update("jax_numpy_rank_promotion", "raise")
