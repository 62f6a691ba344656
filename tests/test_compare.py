"""dualroute compare: time to the dense twin's final loss, loss at its time budget, configs, and the command."""

from __future__ import annotations

import json

import pytest

from dualroute.cli import main
from dualroute.train.compare import (
    at_budget,
    compare_table,
    crossing,
    find_baseline,
    preset_configs,
    time_to_target,
    value_at,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def evals(*points: tuple[int, float, float]) -> list[dict]:
    """Eval records from (step, training seconds, val_loss)."""
    return [{"step": s, "train_time": t, "val_loss": v} for s, t, v in points]


def run(seed: int, *points: tuple[int, float, float]) -> dict:
    summary = {"params_active": 10, "params_total": 40, "unit": "tokens", "throughput": 100.0}
    return {"seed": seed, "summary": summary, "evals": evals(*points)}


CURVE = evals((0, 0.0, 3.0), (10, 5.0, 2.0), (20, 10.0, 1.0))


def test_crossing_interpolates_between_the_two_evals_around_it():
    hit = crossing(CURVE, 1.5)
    assert (hit.step, hit.seconds) == pytest.approx((15.0, 7.5))
    hit = crossing(CURVE, 2.6)  # 40% of the way from 3.0 to 2.0
    assert (hit.step, hit.seconds) == pytest.approx((4.0, 2.0))


def test_crossing_exactly_at_an_eval_is_that_eval():
    hit = crossing(CURVE, 2.0)
    assert (hit.step, hit.seconds) == (10, 5.0)


def test_crossing_not_reached_is_none():
    assert crossing(CURVE, 0.99) is None


def test_crossing_is_the_first_one():
    noisy = evals((0, 0.0, 3.0), (10, 4.0, 1.4), (20, 8.0, 1.6), (30, 12.0, 1.0))
    hit = crossing(noisy, 1.5)
    assert hit.step == pytest.approx(10 * 1.5 / 1.6) and hit.seconds == pytest.approx(4 * 1.5 / 1.6)


def test_value_at_interpolates_and_never_extrapolates():
    assert value_at(CURVE, 7.5, "train_time") == pytest.approx(1.5)
    assert value_at(CURVE, 10, "step") == 2.0
    assert value_at(CURVE, 10.0, "train_time") == 1.0  # the run's very end
    assert value_at(CURVE, 10.01, "train_time") is None


def test_time_to_target_on_unequal_eval_grids():
    # The dense twin evaluates every 10 steps and ends at 1.0 after 20 steps / 10 s; the MoE model evaluates
    # every 4 steps, is slower per step (1 s) and passes 1.0 between step 12 (1.2) and step 16 (0.8).
    runs = {"dense": [run(0, (0, 0.0, 3.0), (10, 5.0, 2.0), (20, 10.0, 1.0))],
            "moe": [run(0, (0, 0.0, 3.0), (4, 4.0, 2.2), (8, 8.0, 1.8), (12, 12.0, 1.2), (16, 16.0, 0.8),
                        (20, 20.0, 0.7))]}
    result = time_to_target(runs, "dense")
    assert result["moe"]["steps"] == [pytest.approx(14.0)] and result["moe"]["seconds"] == [pytest.approx(14.0)]
    assert result["moe"]["step_ratio"] == [pytest.approx(14 / 20)]
    assert result["moe"]["time_ratio"] == [pytest.approx(14 / 10)]
    assert result["dense"]["step_ratio"] == [1.0] and result["dense"]["time_ratio"] == [1.0]
    # At the dense twin's 10 s the MoE model is between 8 s (1.8) and 12 s (1.2).
    assert at_budget(runs, "dense") == {"dense": [1.0], "moe": [pytest.approx(1.5)]}


def test_each_seed_is_measured_against_the_dense_seed_and_spread_is_reported():
    # Dense seeds end at losses 1.0 / 1.2 / 1.1 after 10 s; the MoE seeds reach each of them at 8 / 9 / 7 s.
    dense = [run(s, (0, 0.0, 2.0), (10, 10.0, end)) for s, end in [(0, 1.0), (1, 1.2), (2, 1.1)]]
    moe = [run(s, (0, 0.0, 2.0), (at, at, end), (12, 12.0, end - 0.1))
           for s, at, end in [(0, 8, 1.0), (1, 9, 1.2), (2, 7, 1.1)]]
    runs = {"dense": dense, "moe": moe}
    assert time_to_target(runs, "dense")["moe"]["time_ratio"] == pytest.approx([0.8, 0.9, 0.7])
    table = compare_table(runs, "dense")
    assert "| moe | 8 ± 1 | 0.80 ± 0.10 | 8.0 ± 1.0 | 0.80 ± 0.10 |" in table
    assert "Target = dense's final val_loss (1.1000 ± 0.1000)" in table


def test_some_seeds_missing_the_target_are_counted_not_averaged():
    dense = [run(s, (0, 0.0, 2.0), (10, 10.0, 1.0)) for s in (0, 1, 2)]
    moe = [run(0, (0, 0.0, 2.0), (8, 8.0, 1.0), (10, 10.0, 0.9)),
           run(1, (0, 0.0, 2.0), (10, 10.0, 1.1)),  # never reaches 1.0, and stops at the budget
           run(2, (0, 0.0, 2.0), (6, 6.0, 1.0))]  # shorter than the dense twin's 10 s
    table = compare_table({"dense": dense, "moe": moe}, "dense")
    row = next(line for line in table.splitlines() if line.startswith("| moe | 7 ± 1"))
    assert "0.70 ± 0.14 (1/3 not reached)" in row
    assert "| 1.0000 ± 0.1414 (1/3 shorter than the budget) |" in row  # 0.9 and 1.1 at 10 s
    one = {"dense": dense, "moe": moe[:1] + [run(s, (0, 0.0, 2.0), (10, 10.0, 1.1)) for s in (1, 2)]}
    assert "| moe | 8 (2/3 not reached) | 0.80 (2/3 not reached) |" in compare_table(one, "dense")  # no "± 0"
    slow = {"dense": dense, "moe": [run(s, (0, 0.0, 2.0), (10, 10.0, 1.5)) for s in (0, 1, 2)]}
    assert "| moe | not reached | not reached | not reached | not reached | 1.5000 ± 0.0000 |" \
        in compare_table(slow, "dense")


def test_the_baseline_must_have_every_seed():
    with pytest.raises(ValueError, match=r"no run for seed\(s\) \[1\]"):
        time_to_target({"dense": [run(0, (0, 0.0, 1.0))], "moe": [run(1, (0, 0.0, 1.0))]}, "dense")


# ---- configs ---------------------------------------------------------------------------------------------


def test_the_dense_twin_is_found_or_named():
    configs = preset_configs(["lm-dense-small", "lm-flat-small", "lm-dual-small"], [])
    assert find_baseline(configs) == "lm-dense-small"
    assert find_baseline(configs, "lm-flat-small") == "lm-flat-small"
    with pytest.raises(ValueError, match="no dense preset among lm-flat-small, lm-dual-small.*--baseline"):
        find_baseline(preset_configs(["lm-flat-small", "lm-dual-small"], []))
    with pytest.raises(ValueError, match=r"several dense presets \(lm-dense-small, digits-dense\)"):
        find_baseline(preset_configs(["lm-dense-small", "digits-dense"], []))
    with pytest.raises(ValueError, match="--baseline digits-dense is not among"):
        find_baseline(configs, "digits-dense")


def test_overrides_and_toml_reach_every_preset_and_the_twin_keeps_equal_active_width(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlr = 0.001\n\n[model]\ndim = 64\n\n[model.moe]\nexperts_per_token = 4\n")
    configs = preset_configs(["lm-dense-small", "lm-dual-small"], ["model.moe.hidden=64", "train.steps=7"], str(toml))
    dense, dual = configs["lm-dense-small"], configs["lm-dual-small"]
    assert dense.train.lr == dual.train.lr == 0.001 and dense.train.steps == dual.train.steps == 7
    assert dual.model.moe.experts_per_token == 4 and dual.model.moe.hidden == 64
    assert dual.model.dim == dual.model.moe.dim == dense.model.dim == 64  # model.dim resizes the MoE config too
    assert dense.model.moe is None and dense.model.dense_twin_of == dual.model.moe


# ---- the command ------------------------------------------------------------------------------------------


def test_compare_command_with_config_file(tmp_path, capsys):
    toml = tmp_path / "tiny.toml"
    toml.write_text("[model]\ndim = 16\nn_layers = 1\n\n[train]\nbatch_size = 16\neval_every = 1\n"
                    "eval_batches = 2\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "digits-dual,digits-dense", "--seeds", "0,1", "--steps", "3", "--out", str(out),
            "--quiet", "--config", str(toml), "train.lr=0.003"]
    assert main(argv) == 0
    table = (out / "compare.md").read_text()
    assert "× digits-dense" in table and "val_acc @ digits-dense's time" in table and "every 1 steps" in table
    assert "| digits-dense | " in table and "| 1.00 ± 0.00 |" in table
    saved = json.loads((out / "digits-dense" / "seed1" / "config.json").read_text())
    assert saved["model"]["dim"] == 16 and saved["train"]["eval_every"] == 1 and saved["train"]["lr"] == 0.003
    assert saved["train"]["steps"] == 3
    runs = json.loads((out / "compare.json").read_text())
    assert [r["seed"] for r in runs["digits-dual"]] == [0, 1] and len(runs["digits-dense"][0]["evals"]) == 4
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps to target" in capsys.readouterr().out
    (out / "compare.md").unlink()
    assert main(["compare", "--report-only", "--out", str(out)]) == 0  # no training: the report from compare.json
    assert (out / "compare.md").read_text() == table and "compare.json" not in capsys.readouterr().out.splitlines()[-1]


def test_report_only_gathers_runs_trained_separately(tmp_path, capsys):
    tiny = ["train.steps=2", "model.dim=16", "model.n_layers=1", "train.batch_size=16", "train.eval_every=1",
            "train.eval_batches=2", "--quiet"]
    out = tmp_path / "cmp"
    for preset in ("digits-dense", "digits-dual"):  # as two processes, or two machines, would train them
        assert main(["train", preset, "train.seed=0", "--out", str(tmp_path / "elsewhere" / preset), *tiny]) == 0
        (out / preset).mkdir(parents=True)
        (tmp_path / "elsewhere" / preset).rename(out / preset / "seed0")  # moved after training
    capsys.readouterr()
    argv = ["compare", "--report-only", "--presets", "digits-dense,digits-dual", "--seeds", "0", "--out", str(out)]
    assert main(argv) == 0
    assert "compare.json" in capsys.readouterr().out.splitlines()[-1]
    runs = json.loads((out / "compare.json").read_text())
    assert [(r["preset"], r["seed"]) for rs in runs.values() for r in rs] == [("digits-dense", 0), ("digits-dual", 0)]
    logged = [json.loads(line) for line in (out / "digits-dual" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [e["val_loss"] for e in runs["digits-dual"][0]["evals"]] == [r["val_loss"] for r in logged if "val_loss" in r]
    assert runs["digits-dual"][0]["summary"]["params_total"] > runs["digits-dense"][0]["summary"]["params_total"]
    assert "| digits-dual |" in (out / "compare.md").read_text()
    assert main(argv + ["--seeds", "0,1"]) == 0  # compare.json exists now: the report is rewritten from it
    (out / "compare.json").unlink()
    assert main(argv[:-2] + ["--seeds", "0,1", "--out", str(out)]) == 2
    assert f"no finished run (summary.json) in {out / 'digits-dense' / 'seed1'}" in capsys.readouterr().err
    (out / "digits-dual" / "seed0").rename(out / "digits-dual" / "seed3")
    (out / "digits-dense" / "seed0").rename(out / "digits-dense" / "seed3")
    assert main(argv[:-4] + ["--seeds", "3", "--out", str(out)]) == 2
    assert "was trained with train.seed=0, not 3" in capsys.readouterr().err


def test_compare_lockstep_trains_the_same_runs_side_by_side(tmp_path, monkeypatch):
    from dualroute.train import trainer

    rounds = []
    lockstep = trainer.train_lockstep
    monkeypatch.setattr(trainer, "train_lockstep",
                        lambda cfgs, **kw: rounds.append((len(cfgs), kw["turn_steps"])) or lockstep(cfgs, **kw))
    tiny = ["--presets", "digits-dual,digits-dense", "--seeds", "0,1", "--steps", "2", "--quiet", "model.dim=16",
            "model.n_layers=1", "train.batch_size=16", "train.eval_every=1", "train.eval_batches=2"]
    assert main(["compare", *tiny, "--out", str(tmp_path / "seq")]) == 0 and rounds == []
    assert main(["compare", *tiny, "--out", str(tmp_path / "lock"), "--lockstep"]) == 0
    assert rounds == [(2, 50), (2, 50)]  # a round per seed, 50 steps a turn by default
    assert main(["compare", *tiny, "--out", str(tmp_path / "lock1"), "--lockstep", "1"]) == 0
    assert rounds[2:] == [(2, 1), (2, 1)]

    def losses(out):
        runs = json.loads((out / "compare.json").read_text())
        return {p: [[e["val_loss"] for e in r["evals"]] for r in rs] for p, rs in runs.items()}

    assert losses(tmp_path / "lock") == losses(tmp_path / "lock1") == losses(tmp_path / "seq")


def test_compare_learning_rate_sweep_keeps_each_presets_best(tmp_path, capsys, monkeypatch):
    from dualroute.train import compare

    final = {("digits-dense", 0.001): 0.5, ("digits-dense", 0.003): 0.7,  # dense prefers 1e-3, dual 3e-3
             ("digits-dual", 0.001): 0.9, ("digits-dual", 0.003): 0.6}
    trained = []

    def fake_run(cfg, seed, preset, progress):
        trained.append((preset, seed, cfg.train.lr, cfg.train.out_dir))
        loss = final[(preset, cfg.train.lr)] - 0.01 * seed
        evals = [{"step": 0, "val_loss": 2.0, "train_time": 0.0},
                 {"step": 3, "val_loss": loss, "train_time": 1.0}]
        summary = {"params_active": 1, "params_total": 2, "throughput": 10.0, "unit": "images"}
        return {"preset": preset, "seed": seed, "lr": cfg.train.lr, "summary": summary, "evals": evals}

    monkeypatch.setattr(compare, "_run_one", fake_run)
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "digits-dense,digits-dual", "--seeds", "0,1", "--out", str(out),
                 "--quiet", "--lrs", "1e-3,3e-3"]) == 0
    assert [(p, s, lr) for p, s, lr, _ in trained] == [
        ("digits-dense", 0, 0.001), ("digits-dual", 0, 0.001), ("digits-dense", 0, 0.003), ("digits-dual", 0, 0.003),
        ("digits-dense", 1, 0.001), ("digits-dual", 1, 0.003)]
    assert len({d for *_, d in trained}) == 6  # every run in its own directory
    runs = json.loads((out / "compare.json").read_text())
    assert [(r["seed"], r["lr"]) for r in runs["digits-dual"]] == [(0, 0.003), (1, 0.003)]
    table = (out / "compare.md").read_text()
    assert "| digits-dense | **0.5000** | 0.7000 |" in table and "| digits-dual | 0.9000 | **0.6000** |" in table
    assert main(["compare", "--presets", "digits-dense", "--lrs", "1e-3,x"]) == 2
    assert "--lrs takes comma-separated learning rates, got '1e-3,x'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["compare", "--presets", "digits-dual,digits-flat"], "no dense preset among digits-dual, digits-flat"),
    (["compare", "--presets", "digits-dual", "--config", "missing.toml"], "config file not found: missing.toml"),
    (["compare", "--presets", "digits-dense", "--baseline", "lm-dense-small"], "--baseline lm-dense-small is not among"),
    (["compare", "--report-only", "--out", "nowhere"], "no finished run (summary.json) in nowhere/lm-dense/seed0"),
    (["compare", "--presets", "digits-dense", "--seeds", "0,a"], "--seeds takes comma-separated integers, got '0,a'"),
    (["compare", "--presets", "digits-dense", "--lockstep", "0"], "--lockstep takes the steps per turn, an integer >= 1"),
])
def test_compare_errors_before_training(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
