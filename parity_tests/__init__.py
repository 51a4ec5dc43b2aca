"""Cross-backend parity: the same weights and batches through torch_rlhf and jax_rlhf.

A package (not only a test directory) because `rlhf parity` imports `parity_tests.run`; the
library modules are `tolerances`, `harness`, `objectives`, `batches`, `shared_cases`, `levels`,
`decoding`, `run` and `measure`. See docs/parity.md.
"""
