"""dualroute bench scaling: the study's models, its arithmetic, and a tiny study end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualroute.bench import scaling
from dualroute.bench.scaling import Model, equal_time_loss, steps_to_target, study_models, summarize, verdict


def test_study_models_keep_the_active_size_and_skip_what_cannot_be_grouped():
    models = study_models([8, 12], [4, 8], 2)
    assert [m.name for m in models] == ["dense", "flat-E8", "dual-G4-E8", "dual-G8-E8", "flat-E12", "dual-G4-E12"]
    assert models[2].overrides == ["model.moe.num_experts=8", "model.moe.num_groups=4", "model.moe.groups_per_token=2"]
    assert models[0].overrides == [] and [m.name for m in study_models([4], [1, 2], 2)] == ["dense", "flat-E4",
                                                                                           "dual-G2-E4"]
    configs = scaling.model_configs(models[:3], ["model.moe.hidden=64"])
    dense, flat, dual = configs.values()
    assert dual.model.moe.num_experts == 8 and dual.model.moe.num_groups == 4 and flat.model.moe.num_groups == 1
    assert dense.model.moe is None and dense.model.dense_twin_of.hidden == 64  # the twin stays as wide
    command = scaling.train_command(models[0], 3, scaling.Path("out"), ["model.moe.hidden=64"])
    assert "model.dense_twin_of.hidden=64" in command and "train.seed=3" in command and "--resume" in command


def test_equal_time_is_the_twins_steps_over_the_step_time_ratio():
    evals = [{"step": 0, "val_loss": 3.0}, {"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": 1.0}]
    assert equal_time_loss(evals, 20, 2.0) == 2.0  # twice as slow: 10 steps in the twin's time
    assert equal_time_loss(evals, 20, 1.6) == pytest.approx(1.75)  # 12.5 steps, between two evals
    assert equal_time_loss(evals, 20, 1.0) == 1.0
    assert equal_time_loss(evals, 20, 0.5) is None  # would need 40 steps: the run is too short
    with pytest.raises(ValueError, match="ratio must be > 0"):
        equal_time_loss(evals, 20, 0.0)


def test_steps_to_target_interpolates_to_the_twins_final_loss_and_says_when_not_reached():
    def evals(*points):
        return [{"step": step, "val_loss": loss, "train_time": step / 10} for step, loss in points]

    twin = evals((0, 3.0), (50, 2.0), (100, 1.5))
    fast = evals((0, 3.0), (40, 2.0), (60, 1.0))
    assert steps_to_target(fast, twin) == pytest.approx(0.5)  # 1.5 halfway between steps 40 and 60
    assert steps_to_target(twin, twin) == 1.0
    assert steps_to_target(evals((100, 1.6)), twin) is None

    def run(seed, history):
        return {"seed": seed, "evals": history, "summary": {"params_total": 1, "params_active": 1}}

    runs = {"dense": [run(0, twin), run(1, twin)], "flat-E4": [run(0, fast), run(1, twin[:2])]}
    time_run = {"step_s": {"dense": 1.0, "flat-E4": 1.2}, "router_s": {"flat-E4": 0.1}, "repeats": 1,
                "tokens_per_step": 8, "threads": 1}
    timing = scaling.merge_timings([time_run])
    rows = summarize([Model("dense", "lm-dense"), Model("flat-E4", "lm-flat", 4, 1, 1)], runs, timing, None)
    assert rows["flat-E4"]["steps_to_target"] == [pytest.approx(0.5), None]
    assert rows["flat-E4"]["time_to_target"] == [pytest.approx(0.6), None]  # steps x the step-time ratio
    table = scaling.report_table(rows, timing, None)
    assert "| 0.50 (1 not reached) | 0.60 (1 not reached) | 8.3% | - |" in table  # router share 0.1 / 1.2
    assert "median of 1 such run of the time phase; equal time" in table
    timed = {**time_run, "optimizer_s": {"dense": 0.1, "flat-E4": 0.3}}
    timing = scaling.merge_timings([time_run, timed])
    rows = summarize([Model("dense", "lm-dense"), Model("flat-E4", "lm-flat", 4, 1, 1)], runs, timing, None)
    table = scaling.report_table(rows, timing, None)
    assert "| 8.3% | 25.0% |" in table
    assert "median of 2 such runs of the time phase; the AdamW share over the 1 that timed it" in table


def test_the_step_ratio_is_the_median_over_time_runs_of_each_runs_own_ratio(tmp_path):
    def run(dense, flat, router):
        return {"step_s": {"dense": dense, "flat-E4": flat}, "router_s": {"flat-E4": router},
                "repeats": 9, "tokens_per_step": 8, "threads": 2}

    runs = [run(1.0, 1.1, 0.11), run(2.0, 2.6, 0.13), run(1.0, 1.2, 0.06)]  # the second run's VM was slow
    assert scaling.merge_timings(runs)["optimizer_share"] == {}  # runs from before the update was timed
    runs[1]["optimizer_s"], runs[2]["optimizer_s"] = {"dense": 0.2, "flat-E4": 0.52}, {"dense": 0.1, "flat-E4": 0.3}
    assert scaling.merge_timings(runs)["optimizer_share"] == {"dense": pytest.approx(0.1),  # of 0.1, 0.1
                                                              "flat-E4": pytest.approx(0.225)}  # of 0.2, 0.25
    merged = scaling.merge_timings(runs)
    assert merged["step_ratio"] == {"dense": 1.0, "flat-E4": pytest.approx(1.2)}  # of 1.1, 1.3, 1.2
    assert merged["router_share"] == {"flat-E4": pytest.approx(0.05)}  # of 0.1, 0.05, 0.05
    assert merged["runs"] == 3 and scaling.merge_timings([]) is None
    assert scaling.merge_timings(runs[:2])["step_ratio"]["flat-E4"] == pytest.approx(1.2)  # two: their mean
    path = tmp_path / "time.json"
    assert scaling.read_timings(path) == []
    path.write_text(json.dumps(runs[0]))  # one run, as the file was before runs were kept
    assert scaling.read_timings(path) == [runs[0]]
    path.write_text(json.dumps({"runs": runs}))
    assert scaling.read_timings(path) == runs
    for bad in ("{not json", json.dumps([1, 2]), json.dumps({"runs": [{"router_s": {}}]})):
        path.write_text(bad)
        with pytest.raises(ValueError, match="time.json .*remove it and run --phases time again"):
            scaling.read_timings(path)


def test_verdict_needs_the_difference_beyond_twice_its_spread():
    assert verdict([-0.10, -0.12, -0.11]) == "better"
    assert verdict([0.10, 0.12]) == "worse"
    assert verdict([-0.10, 0.08]) == "level"
    assert verdict([-0.5]) == "(one seed)"


TINY = ["data.kind=text", "train.steps=4", "train.eval_every=2", "model.dim=16", "model.n_layers=1",
        "model.moe.hidden=16", "train.batch_size=4", "train.seq_len=16", "train.eval_batches=1"]


@pytest.mark.slow
def test_a_tiny_study_trains_times_and_reports_and_resumes_without_retraining(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    argv = ["--experts", "4", "--groups", "2", "--seeds", "0", "--jobs", "2", "--repeats", "1", "--world", "2",
            "--ep-tokens", "32", "--out", str(out), *TINY]
    assert scaling.main(argv) == 0
    table = (out / "scaling.md").read_text()
    assert table.startswith("| model | E | G | J |") and "| dual-G2-E4 | 4 | 2 | 2 |" in table
    saved = json.loads((out / "scaling.json").read_text())
    rows = saved["rows"]
    assert set(rows) == {"dense", "flat-E4", "dual-G2-E4"} and rows["dense"]["step_ratio"] == 1.0
    assert rows["flat-E4"]["bytes_per_token"] > 0 and 0 < rows["dual-G2-E4"]["router_share"] < 1
    assert saved["time"]["runs"] == 1 and len(saved["time_runs"]) == 1
    assert 0 < rows["flat-E4"]["optimizer_share"] < 1 and 0 < rows["dense"]["optimizer_share"] < 1
    assert rows["dual-G2-E4"]["minus_flat"] == [pytest.approx(rows["dual-G2-E4"]["loss_equal_steps"][0]
                                                              - rows["flat-E4"]["loss_equal_steps"][0])]
    assert any(o.startswith("train.threads=") for o in saved["overrides"])  # --jobs 2 shares the cores
    run = json.loads((out / "dual-G2-E4" / "seed0" / "config.json").read_text())
    assert run["model"]["moe"]["num_groups"] == 2 and run["train"]["steps"] == 4
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    assert scaling.main(argv[:-len(TINY)] + ["--phases", ""] + TINY) == 0  # the report again, from --out
    assert scaling.main(argv[:-len(TINY)] + ["--phases", "time"] + TINY) == 0  # a second time run is kept
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["time"]["runs"] == 2 and "median of 2 such runs" in (out / "scaling.md").read_text()


def test_a_failed_run_is_named_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "train_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"flat-E4 seed 0 \(exit 3, see .*flat-E4-seed0.log\)"):
        scaling.train_missing([Model("flat-E4", "lm-flat", 4, 1, 1)], [0], tmp_path, [], jobs=1)


def test_a_world_that_cannot_share_the_experts_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("trained before checking --world"))
    with pytest.raises(ValueError, match="--world 3 does not divide flat-E4's 4 experts"):
        scaling.main(["--experts", "4", "--groups", "2", "--world", "3", "--out", str(tmp_path), *TINY])


@pytest.mark.parametrize("argv, message", [
    (["--experts", "8,x"], "--experts takes comma-separated integers"),
    (["--groups", "0"], "--groups takes integers >= 1"),
    (["--seeds", "-1"], "--seeds takes integers >= 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--phases", "train,fly"], "--phases takes some of train,time,bytes"),
])
def test_bad_arguments_are_named(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        scaling.main(argv + ["--out", str(tmp_path)])
    assert message in capsys.readouterr().err
