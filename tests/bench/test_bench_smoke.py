"""The benchmark end to end at its smallest sizes: it runs, and its outputs have their structure.

No timing is asserted anywhere: the figures depend on the machine and its load, so these tests
only check that every measurement ran and that results.json / results.md hold what
docs/performance.md says they hold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.generation import PAIRED_ONLY, PAIRED_WITH_HF

REPO = Path(__file__).resolve().parents[2]
MICRO = dict(sizes="micro", prompt_len=8, answer_len=8, repeats=1, threads=1)
"""The smallest run: the 35k-parameter model, prompt 8 + answer 8, one timed call each."""

RECORD_KEYS = {"id", "workload", "model", "backend", "command", "worker_command",
               "load_average", "machine", "threads", "versions", "peak_rss_bytes"}


def _args(out: Path, **options) -> argparse.Namespace:
    return argparse.Namespace(out=out, backend=None, **{**MICRO, **options})


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """Every workload of a ``--variants`` run on the micro model, in this process (fast)."""
    out = tmp_path_factory.mktemp("bench")
    assert bench_run.main(None, _args(out, in_process=True, variants=True)) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_document(micro_run):
    _, doc = micro_run
    assert doc["schema"] == "rlhf-parity-bench/1"
    assert doc["failures"] == []
    assert doc["command"].startswith("python -m bench.run")
    env = doc["environment"]
    assert {"machine", "versions", "git", "threads", "load_average", "wall_time_s"} <= set(env)
    assert {"torch", "jax", "transformers", "deepspeed"} <= set(env["versions"])
    assert env["isolated_processes"] is False
    limits = doc["limits"]
    assert set(limits["probes"]) == {"start", "end"}
    for key in ("fp32_peak_flops", "torch_fp32_flops", "memory_bandwidth_bytes"):
        assert limits[key] > 0
    assert set(doc["models"]) == {"micro"}
    assert doc["models"]["micro"]["lm"]["total"] > doc["models"]["micro"]["lm"]["matmul"] > 0


def test_every_workload_is_recorded(micro_run):
    _, doc = micro_run
    ids = {r["id"] for r in doc["results"]}
    for impl in ("hf", "torch", "jax", "jax_bf16", "torch_bf16"):
        assert {f"generation/micro/{impl}/b1", f"generation/micro/{impl}/b16"} <= ids
    for kind in ("sft", "ppo"):
        assert {f"{kind}/micro/torch", f"{kind}/micro/jax"} <= ids
    # conventions.old_logprobs rollout: the PPO iteration without the actor's scoring forward
    assert {"ppo/micro/torch/rollout-logprobs", "ppo/micro/jax/rollout-logprobs"} <= ids
    for record in doc["results"]:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert "--only" in record["command"] and record["peak_rss_bytes"] > 0


def test_derived_figures(micro_run):
    _, doc = micro_run
    by_workload: dict[str, list[dict]] = {}
    for record in doc["results"]:
        by_workload.setdefault(record["workload"], []).append(record)
    for r in by_workload["generation"]:
        assert {"tokens_per_s", "ms_per_token", "vs_hf", "fraction_of_fp32_peak",
                "roofline_s", "first_call_s", "compile_s", "times_s"} <= set(r)
        # The torch rollout path and the JAX sampler (fp32, bf16) are also timed alternately
        # with HF generate in their process.
        assert ("paired_hf" in r) == (r["backend"] in PAIRED_WITH_HF)
        if r["backend"] in PAIRED_WITH_HF:
            pair = r["paired_hf"]
            assert r["vs_hf_same_process"] == pair["vs_hf"] == pytest.approx(
                pair["hf"]["median_s"] / pair["self"]["median_s"])
            if r["backend"] in PAIRED_ONLY:  # timed in its pairs only
                assert r["timed"] == "paired_only"
                assert r["times_s"] == pair["self"]["times_s"]
    for r in by_workload["sft_step"]:
        assert {"tokens_per_s", "mfu", "plain_mfu", "overhead_fraction",
                "step_s"} <= set(r)
    for r in by_workload["ppo_iteration"]:
        assert {"iteration_s", "generation_s", "scoring_s", "training_s", "other_s",
                "ppo_step_mfu", "framework_overhead_fraction", "plain_step_s",
                "plain_scoring_s", "rollout_path"} <= set(r)
        assert r["rollout_path"] in ("module", "jax_sampler")
        assert r["old_logprobs"] == ("rollout" if r["id"].endswith("/rollout-logprobs")
                                     else "recompute")
        if r["old_logprobs"] == "rollout":  # measured in its recompute row's process
            assert r["same_process_as"] == r["id"].removesuffix("/rollout-logprobs")
            assert set(r["vs_recompute_same_process"]) == {"iteration", "scoring"}
    targets = {t["target"] for t in doc["targets"]}
    jax_paired = "vs HF generate, tokens/s at batch 16 (same process, alternating calls)"
    assert {f"JAX sampler {jax_paired}", f"JAX sampler, bf16 rollouts, {jax_paired}",
            "JAX sampler, bf16 rollouts, share of its roofline at batch 16"} <= targets
    paired = "torch rollout path vs HF generate, tokens/s at batch 1 (same process, " \
             "alternating calls)"
    assert paired in targets
    assert {"torch SFT step MFU", "jax PPO iteration framework overhead"} <= targets
    for t in doc["targets"]:
        assert set(t) >= {"value", "threshold", "direction", "met", "model"}


def test_markdown_tables(micro_run):
    out, _ = micro_run
    text = (out / "results.md").read_text()
    for heading in ("## Machine limits", "## Generation", "## Training steps",
                    "## PPO iteration", "## Targets"):
        assert heading in text


def test_subprocess_worker(tmp_path):
    """The default mode: `python -m bench.run`, each measurement in a fresh process."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench.run", "--sizes", "micro", "--prompt-len", "8",
               "--answer-len", "8", "--repeats", "1", "--threads", "1",
               "--only", "generation/micro/hf", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["environment"]["isolated_processes"] is True
    assert doc["partial"] is False and doc["not_run"] == [] and "stopped_by" not in doc
    assert [r["id"] for r in doc["results"]] == ["generation/micro/hf/b1",
                                                 "generation/micro/hf/b16"]
    assert all(r["worker_command"] for r in doc["results"])
    assert (out / "logs" / "generation-micro-hf.log").exists()


def test_gpu_recipe_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the recipe would really run")
    out = tmp_path / "out"
    assert bench_run.main(None, _args(out, gpu_recipe=True, in_process=True)) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in doc["recipe"]] == ["recipe/torch/hybrid-on",
                                                "recipe/torch/hybrid-off", "recipe/jax"]
    assert all("skipped" in r for r in doc["recipe"])
    assert "GPU recipe" in (out / "results.md").read_text()


@pytest.mark.slow
def test_gpu_recipe_dry_run(tmp_path):
    """The recipe's code path on tiny OPT models on any device; on CPU the Hybrid Engine
    variant reports why it is unavailable instead of a time."""
    out = tmp_path / "out"
    assert bench_run.main(None, _args(out, gpu_recipe=True, recipe_dry_run=True,
                                      in_process=True)) == 0
    doc = json.loads((out / "results.json").read_text())
    recipe = {r["id"]: r for r in doc["recipe"]}
    assert set(recipe) == {"recipe/torch/hybrid-on", "recipe/torch/hybrid-off", "recipe/jax"}
    for variant in ("recipe/torch/hybrid-off", "recipe/jax"):
        assert {"iteration_s", "generation_s", "scoring_s", "training_s"} <= set(recipe[variant])
    on = recipe["recipe/torch/hybrid-on"]
    assert "iteration_s" in on or "unavailable" in on


@pytest.mark.parametrize("rollout_dtype, bytes_per_weight", [("float32", 4), ("bfloat16", 2)])
def test_profile_generation_micro(tmp_path, capsys, rollout_dtype, bytes_per_weight):
    """`python -m bench.profile_generation` runs end to end and its figures are consistent
    with each other (no timing threshold: only their relations)."""
    from bench import profile_generation
    from bench.models import SIZES

    out = tmp_path / "profile.json"
    assert profile_generation.main(["--size", "micro", "--batch", "2", "--prompt-len", "8",
                                    "--answer-len", "4", "--repeats", "1",
                                    "--model-cache", str(tmp_path / "models"),
                                    "--rollout-dtype", rollout_dtype,
                                    "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rollout_dtype"] == rollout_dtype
    layers, head = profile_generation._weight_shapes(SIZES["micro"])
    weights = SIZES["micro"]["num_hidden_layers"] * sum(a * b for a, b in layers)
    assert result["matmul_floor_step_s"]["weight_bytes"] == bytes_per_weight * (
        weights + head[0] * head[1])
    tokens = 2 * 4
    assert result["jax_tokens_per_s"] == pytest.approx(tokens / result["jax_generate_s"])
    assert result["best_case_s"] == pytest.approx(
        result["jax_prefill_s"] + 4 * result["matmul_floor_step_s"]["jax_s"])
    assert result["best_case_vs_hf"] == pytest.approx(
        result["hf_generate_s"] / result["best_case_s"])
    assert result["matmul_floor_step_s"]["weight_bytes"] > 0
    assert "| JAX decode step |" in capsys.readouterr().out


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """results.json/.md are written after every task: a run that dies after its first
    measured row leaves that row, marked partial. The measurements are faked (no model runs)."""
    out = tmp_path / "out"
    probe = {"fp32_peak_flops": 1e10, "torch_fp32_flops": 1e10, "jax_fp32_flops": None,
             "torch_bf16_flops": None, "memory_bandwidth_bytes": 1e9, "bf16_native": False}
    timing = {"median_s": 0.5, "min_s": 0.5, "times_s": [0.5]}
    sft = {"framework": timing, "plain": {"median_s": 0.4, "times_s": [0.4]},
           "peak_rss_bytes": 2**20}
    ran = []

    def fake(task, directory, timeout):
        ran.append(task["id"])
        if task["id"] == "sft/micro/jax":  # the run dies in its second measurement
            first = json.loads((out / "results.json").read_text())
            assert [r["id"] for r in first["results"]] == ["sft/micro/torch"]
            raise KeyboardInterrupt
        result = {"machine/start": probe, "sft/micro/torch": sft}.get(task["id"])
        return {"ok": True, "result": result, "error": None, "wall_s": 0.1,
                "load_average": None}

    monkeypatch.setattr(bench_run, "_run_subprocess", fake)
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(None, _args(out, only=["sft/micro/*"]))
    assert ran == ["prepare", "machine/start", "sft/micro/torch", "sft/micro/jax"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["partial"] is True and doc["stopped_by"] == "KeyboardInterrupt"
    assert doc["not_run"] == ["sft/micro/jax", "machine/end"]
    assert [r["id"] for r in doc["results"]] == ["sft/micro/torch"]
    assert doc["results"][0]["mfu"] > 0 and doc["failures"] == []
    text = (out / "results.md").read_text()
    assert "**Partial results**: the run stopped (KeyboardInterrupt) before 2 task(s)" in text
    assert "## Training steps" in text
