"""The layer and LM benchmarks run end to end on tiny sizes and report what they claim (no timing asserts)."""

import json

import pytest

from dualroute.bench import run_layer, run_lm

STAGES = {"dense_ffn", "moe_layer", "router", "plan", "dispatch", "experts", "combine", "aux"}


def test_bench_lm_parts(tmp_path, capsys, one_thread):
    out = tmp_path / "lm.json"
    assert run_lm(["--repeats", "1", "--threads", "1", "--parts", "--json", str(out), "model.n_layers=1",
                   "train.batch_size=2", "train.seq_len=8"]) == 0
    result = json.loads(out.read_text())
    assert set(result["medians_s"]) == {"lm-dense", "lm-flat", "lm-dual"}
    assert result["lm-dense_over_lm-dense"] == 1.0
    assert set(result["parts_s"]) == {"lm-flat", "lm-dual"}  # the dense preset has no MoE layer
    for parts in result["parts_s"].values():
        assert set(parts) == STAGES and all(v > 0 for v in parts.values())
    assert "grouped matmuls: dense FFN +" in capsys.readouterr().out


def test_bench_layer_ratios(tmp_path, one_thread):
    out = tmp_path / "layer.json"
    assert run_layer(["--tokens", "8", "--dim", "16", "--hidden", "32", "--repeats", "1", "--decode-repeats", "1",
                      "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["medians_s"]
    assert result["moe_over_dense"] == pytest.approx(medians["moe_vs_dense"]["moe_E8_K2"]
                                                     / medians["moe_vs_dense"]["dense_F2x"])
    assert result["setup"]["T"] == 8


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"], ["--presets", ","]])
def test_bench_lm_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_lm(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err
