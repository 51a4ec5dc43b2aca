"""The benchmark suite: speed, cost and scale of both backends (docs/performance.md).

``python -m bench.run`` (or ``bench.run.main(config, args)``, what ``rlhf bench`` calls)
measures the machine's limits, generation, the SFT and PPO steps and a PPO iteration of the
torch and JAX backends, each in a fresh process, and writes ``results.json`` and
``results.md``. Importing this package imports neither torch nor JAX.

- ``bench.machine``: matmul peak, bandwidth, versions, machine description, memory probes.
- ``bench.models``: the benchmark's model sizes and their random-weight HF directories.
- ``bench.workspace``: shapes, run configs and synthetic batches.
- ``bench.generation``, ``bench.torch_workloads``, ``bench.jax_workloads``: the workloads.
- ``bench.worker``: one measurement in a fresh process; ``bench.run``: the whole run.
- ``bench.report``: derived figures (MFU, roofline, overhead), targets, the markdown.
- ``bench.gpu_recipe``: DeepSpeed-Chat's OPT-1.3B step-3 shapes on a GPU.
"""
