"""JAX backend of the RLHF framework: flax NNX models, optax, orbax and a sharded `jax.jit` engine.

Kept import-free on purpose: `import jax_rlhf` must not pull in JAX, Flax or transformers.
Import the submodules for the public names: `jax_rlhf.models` (NNX models, HF converter,
LoRA), `jax_rlhf.sharding` (mesh and layouts), `jax_rlhf.sampler`, `jax_rlhf.train` (the
trainers and the pipeline), `jax_rlhf.checkpoint`, `jax_rlhf.distributed` and `jax_rlhf.cli`
(the `rlhf` command's entry point). docs/jax.md describes the design.
"""
