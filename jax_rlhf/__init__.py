"""JAX backend of the RLHF framework: Flax NNX models, sharding and trainers.

Kept import-free on purpose: `import jax_rlhf` must not pull in JAX, Flax or transformers.
Import the submodules (`jax_rlhf.models`, ...) for the public names.
"""
