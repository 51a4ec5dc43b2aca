"""What a user sees of a run: shared.plots (PNG curves of one run, several overlaid), `rlhf
plot`, the held-out metric in TensorBoard, and `logging.report_to` (W&B only when asked).
No training: synthetic run directories in the layout of shared.runlog, and the numpy
backend of test_supervised_loop for the loop's own hook."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shared.cli import main
from shared.config import ConfigError, config_from_dict
from shared.plots import group_panels, plot_run, plot_runs, run_label
from shared.runlog import HELDOUT_STAGE, RunLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, *, backend: str = "torch", scale: float = 1.0,
               steps: tuple[str, ...] = ("sft", "reward", "ppo")) -> Path:
    """A run directory as a pipeline leaves it: metrics.jsonl with SFT (eval every 10
    steps), reward and PPO records (of ``steps``), and summary.json with the held-out
    metric."""
    run_dir.mkdir(parents=True)
    records = []
    for i in range(1, 61):
        records.append({"step": "sft", "iteration": i, "time": 0.0, "loss": scale * 3 / i,
                        "lr": 1e-3 * min(1.0, i / 10), "grad_norm": 1 + math.sin(i),
                        "tokens": 90.0, "skipped_steps": 0})
        if i % 10 == 0:
            records.append({"step": "sft", "iteration": i, "time": 0.0,
                            "eval_loss": scale * 3.2 / i, "eval_perplexity": math.exp(3.2 / i)})
    for i in range(1, 31):
        records.append({"step": "reward", "iteration": i, "time": 0.0, "loss": 0.7 / i,
                        "accuracy": min(1.0, 0.5 + i / 40), "chosen_score": i / 5,
                        "rejected_score": -i / 5, "lr": 1e-3, "skipped_steps": 0})
    records.append({"step": "reward", "iteration": 30, "time": 0.0, "eval_accuracy": 0.95,
                    "eval_chosen_score": 6.0, "eval_rejected_score": -6.0})
    for i in range(1, 21):
        records.append({"step": "ppo", "iteration": i, "time": 0.0, "actor_loss": -0.01,
                        "critic_loss": 40 / i, "pg_loss": -0.01 + i * 1e-4, "ptx_loss": 0.0,
                        "reward_score": scale * (i / 10 - 1), "kl": 0.01 * i,
                        "approx_kl": 1e-3 * i, "kl_coef": 0.05, "clip_fraction": 0.02,
                        "value_clip_fraction": 0.4 - i / 100, "entropy": 0.5 - i / 200,
                        "actor_lr": 1e-4, "critic_lr": 1e-3, "generation_time": 0.01,
                        "scoring_time": 0.02, "training_time": 0.08 + i / 1000,
                        "response_length": 2.8, "short_answers": 0, "skipped_steps": 0,
                        "rollout_path": "module"})
    records = [r for r in records if r["step"] in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"backend": backend,
               "sft": {"heldout": {"arithmetic_accuracy": 0.44 * scale,
                                   "arithmetic_accuracy_greedy": 0.71}},
               "reward": {"eval_accuracy": 0.95},
               "ppo": {"heldout": {"arithmetic_accuracy": 0.61,
                                   "arithmetic_accuracy_greedy": 0.875}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def _png(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and the panel list of a PNG ``shared.plots`` wrote, after checking
    it is a whole PNG of a readable size."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 20_000, (path, len(data))  # drawn curves, not an empty canvas
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file fails here
        assert image.width >= 500 and image.height >= 400
        return image.size, image.info.get("Description", "")


def test_group_panels_places_each_metric_once():
    keys = ["loss", "eval_loss", "critic_loss", "actor_loss", "kl", "approx_kl", "kl_coef",
            "clip_fraction", "value_clip_fraction", "actor_lr", "lr", "generation_time",
            "heldout_arithmetic_accuracy", "eval_accuracy", "mystery_metric"]
    panels = {p.title: set(p.keys) for p in group_panels(keys)}
    assert panels["Loss"] == {"loss", "eval_loss", "actor_loss"}  # eval beside training
    assert panels["Critic loss"] == {"critic_loss"}
    assert panels["KL"] == {"kl", "approx_kl"} and panels["KL coefficient"] == {"kl_coef"}
    assert panels["Clip fractions"] == {"clip_fraction", "value_clip_fraction"}
    assert panels["Learning rate"] == {"actor_lr", "lr"}
    assert panels["Phase times"] == {"generation_time"}
    assert panels["Held-out metric"] == {"heldout_arithmetic_accuracy"}
    assert panels["Pair accuracy"] == {"eval_accuracy"}
    assert panels["mystery metric"] == {"mystery_metric"}  # unknown: a panel of its own
    placed = [k for p in group_panels(keys) for k in p.keys]
    assert sorted(placed) == sorted(keys)


def test_plot_run_writes_one_readable_png_per_step(tmp_path):
    run_dir = _write_run(tmp_path / "demo")
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["sft.png", "reward.png", "ppo.png", "heldout.png"]
    assert all(p.parent == run_dir / "plots" for p in paths)
    panels = {p.stem: _png(p)[1] for p in paths}
    assert panels["sft"] == ("panels: Loss; Perplexity; Held-out metric; Gradient norms; "
                             "Learning rate")  # tokens: 90 throughout, not drawn
    assert "Reward-model scores" in panels["reward"] and "Pair accuracy" in panels["reward"]
    ppo = panels["ppo"].removeprefix("panels: ").split("; ")
    assert {"Loss", "Critic loss", "Reward", "Held-out metric", "KL", "Clip fractions",
            "Entropy", "Phase times"} <= set(ppo)
    # 0 throughout (ptx_loss, skipped_steps) or constant (kl_coef, learning rates): not drawn
    assert "Skipped steps" not in ppo and "KL coefficient" not in ppo
    assert "Learning rate" not in ppo
    assert panels["heldout"] == ("panels: Held-out arithmetic_accuracy; "
                                 "Held-out arithmetic_accuracy_greedy")
    only_ppo = plot_run(run_dir, steps=["ppo"], out_dir=tmp_path / "elsewhere")
    assert [p.name for p in only_ppo] == ["ppo.png", "heldout.png"]
    assert only_ppo[0].parent == tmp_path / "elsewhere"


def test_plot_runs_overlays_runs_named_by_dir_and_backend(tmp_path):
    torch_run = _write_run(tmp_path / "torch" / "demo", backend="torch")
    jax_run = _write_run(tmp_path / "jax" / "demo", backend="jax", scale=1.1)
    assert run_label(torch_run) == "demo (torch)"
    paths = plot_runs([torch_run, jax_run], tmp_path / "compare")
    assert [p.name for p in paths] == ["compare-sft.png", "compare-reward.png",
                                       "compare-ppo.png", "compare-heldout.png"]
    for path in paths:
        _png(path)
    (width, _), ppo_panels = _png(tmp_path / "compare" / "compare-ppo.png")
    assert width >= 1500 and "Reward" in ppo_panels
    assert not (torch_run / "plots").exists()  # a comparison leaves the runs alone


def test_rlhf_plot_one_run_and_a_comparison(tmp_path, monkeypatch, capsys):
    run_dir = _write_run(tmp_path / "a", steps=("ppo",))
    assert main(["plot", str(run_dir)]) == 0
    assert f"to {run_dir / 'plots'}" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["heldout.png", "ppo.png"]
    other = _write_run(tmp_path / "b", backend="jax", steps=("ppo",))
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(run_dir), str(other)]) == 0  # default --out: ./plots-compare
    assert (tmp_path / "plots-compare" / "compare-ppo.png").is_file()
    assert main(["plot", str(run_dir), str(other), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert f"to {tmp_path / 'cmp'}" in out and "compare-heldout.png" in out


@pytest.mark.parametrize("make", ["missing", "not a run"])
def test_rlhf_plot_of_a_bad_directory_is_one_line_and_exit_2(tmp_path, make, caplog, capsys):
    bad = tmp_path / "nope"
    if make == "not a run":
        bad.mkdir()
    assert main(["plot", str(bad)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    text = "\n".join(errors) or capsys.readouterr().err.strip()
    assert str(bad) in text and len(text.splitlines()) == 1, text
    assert ("no such run directory" if make == "missing" else "no metrics.jsonl") in text


def _scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_finish_step_sends_the_heldout_metric_to_tensorboard_and_plots(tmp_path):
    run_logger = RunLogger(tmp_path, plots=True)
    for i in (1, 2, 3):
        run_logger.log("sft", i, {"loss": 1.0 / i})
    summary = run_logger.finish_step(
        "sft", 3, sft={"heldout": {"arithmetic_accuracy": 0.25}}, backend="torch")
    run_logger.log("ppo", 1, {"reward_score": 0.5})
    run_logger.finish_step("ppo", 1, ppo={"heldout": {"arithmetic_accuracy": 0.75},
                                          "heldout_ema": {"arithmetic_accuracy": 0.5}})
    run_logger.close()
    assert summary["sft"]["heldout"] == {"arithmetic_accuracy": 0.25}
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["sft/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert scalars["sft/heldout_arithmetic_accuracy"] == [(3, 0.25)]
    assert scalars["ppo/heldout_arithmetic_accuracy"] == [(1, 0.75)]
    assert scalars["ppo/heldout_ema_arithmetic_accuracy"] == [(1, 0.5)]
    # one chart: the metric after SFT, then after PPO
    assert scalars["heldout/arithmetic_accuracy"] == [(HELDOUT_STAGE["sft"], 0.25),
                                                      (HELDOUT_STAGE["ppo"], 0.75)]
    assert scalars["heldout/arithmetic_accuracy_ema"] == [(HELDOUT_STAGE["ppo"], 0.5)]
    # metrics.jsonl holds what the loops logged, and only that
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["iteration"]) for r in records] == [
        ("sft", 1), ("sft", 2), ("sft", 3), ("ppo", 1)]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"sft.png", "ppo.png",
                                                                 "heldout.png"}


def test_a_plot_that_fails_never_fails_the_step(tmp_path, monkeypatch, caplog):
    import shared.plots

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(shared.plots, "plot_run", broken)
    run_logger = RunLogger(tmp_path, enable_tensorboard=False, plots=True)
    run_logger.log("sft", 1, {"loss": 1.0})
    summary = run_logger.finish_step("sft", 1, sft={"steps": 1})
    assert summary == {"sft": {"steps": 1}}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("plots of" in w and "No space left on device" in w for w in warnings)


def test_the_supervised_loop_plots_its_step_and_logs_heldout(tmp_path):
    from test_supervised_loop import DATA, NumpyBackend, _config

    from shared.supervised_loop import SupervisedLoop

    config = _config(sft={"max_steps": 6, "eval_interval": 3})
    run_logger = RunLogger(tmp_path, plots=True)
    loop = SupervisedLoop(config, "sft", data=DATA, run_dir=tmp_path, run_logger=run_logger)
    entry = loop.run(NumpyBackend())
    run_logger.close()
    accuracy = entry["heldout"]["arithmetic_accuracy"]
    assert _scalars(tmp_path / "tensorboard")["sft/heldout_arithmetic_accuracy"] == [
        (6, pytest.approx(accuracy))]
    _, panels = _png(tmp_path / "plots" / "sft.png")
    assert "Held-out metric" in panels and "Loss" in panels


@pytest.mark.parametrize(("given", "expected"), [
    (None, ("tensorboard",)), ("all", ("tensorboard", "wandb")), ("none", ()),
    ("wandb", ("wandb",)), (["wandb", "tensorboard"], ("wandb", "tensorboard")), ([], ())])
def test_report_to_reads_the_hugging_face_forms(given, expected):
    logging = {} if given is None else {"report_to": given}
    assert config_from_dict({"logging": logging}).logging.report_to == expected


@pytest.mark.parametrize("given", [["none", "wandb"], "comet", ["all"], 3])
def test_report_to_refuses_other_values_naming_the_key(given):
    with pytest.raises(ConfigError, match=r"^logging\.report_to: .* is not a valid 'all' \| "
                                          r"'none' \| 'tensorboard' \| 'wandb' \| list of "
                                          r"'tensorboard' \| 'wandb'$"):
        config_from_dict({"logging": {"report_to": given}})


def test_report_to_wandb_without_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    config = config_from_dict({"logging": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError, match=r"logging\.report_to: lists wandb, but the wandb "
                                          r"package is not installed; `pip install wandb`"):
        RunLogger.from_config(config, tmp_path)
    # the default never imports it
    RunLogger.from_config(config_from_dict({}), tmp_path / "default").close()


def test_report_to_wandb_logs_each_steps_curves_against_its_own_counter(tmp_path,
                                                                        monkeypatch):
    calls = []

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = config_from_dict({"logging": {"report_to": "wandb"}, "seed": 7})
    (tmp_path / "run-7").mkdir()
    run_logger = RunLogger.from_config(config, tmp_path / "run-7")
    run_logger.log("sft", 1, {"loss": 2.0, "note": "text"})
    run_logger.finish_step("sft", 1, sft={"heldout": {"arithmetic_accuracy": 0.5}})
    run_logger.close()
    init = calls[0][1]
    assert init["name"] == "run-7" and init["config"]["seed"] == 7
    assert ("define_metric", "sft/*", "sft/iteration") in calls
    assert ("log", {"sft/loss": 2.0, "sft/iteration": 1}) in calls
    assert ("log", {"sft/heldout_arithmetic_accuracy": 0.5, "sft/iteration": 1}) in calls
    assert ("log", {"heldout/arithmetic_accuracy": 0.5, "heldout/stage": 1}) in calls
    assert calls[-1] == ("finish",)
    assert not (tmp_path / "run-7" / "tensorboard").exists()  # report_to: wandb only
