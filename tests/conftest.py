import jax

# Catch silent broadcasting bugs in the kernels (as rlax's tests do).
jax.config.update("jax_numpy_rank_promotion", "raise")
