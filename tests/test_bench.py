"""``dualroute bench`` finds every sub-command; importing the package leaves transformers unimported.
The layer, LM, generation and HF benchmarks run end to end on tiny sizes and report what they claim (no timing asserts);
``--device`` / ``--dtype`` reach the setup and the header, and bad values are usage errors naming them."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dualroute import experts
from dualroute import layer as layer_mod
from dualroute import routing
from dualroute import bench
from dualroute.bench import hf as bench_hf
from dualroute.bench.common import (TUNING_ENV, Contender, describe_device, device_setup, page_faults,
                                    synchronizer, time_alternating)
from dualroute.bench.generate import main as run_generate
from dualroute.bench.layer import main as run_layer
from dualroute.bench.layer import with_cpu_blocks, without_chunks
from dualroute.bench.lm import lm_train_step
from dualroute.bench.lm import main as run_lm

STAGES = {"dense_ffn", "moe_layer", "router", "plan", "dispatch", "experts", "combine", "aux"}


@pytest.mark.parametrize("name", bench.BENCHES)
def test_every_bench_answers_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main([name, "--help"])
    assert info.value.code == 0
    assert f"usage: dualroute bench {name}" in capsys.readouterr().out


def test_unknown_bench_is_a_usage_error(capsys):
    assert bench.main(["nope"]) == 2 and bench.main([]) == 2
    assert "usage: dualroute bench {layer,lm,generate,balance,hf,ep,mt,scaling}" in capsys.readouterr().err


def test_importing_bench_does_not_import_transformers():
    code = "import sys, dualroute.bench, dualroute.cli; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_lm_parts(tmp_path, capsys, one_thread):
    out = tmp_path / "lm.json"
    assert run_lm(["--repeats", "1", "--threads", "1", "--parts", "--json", str(out), "model.n_layers=1",
                   "train.batch_size=2", "train.seq_len=8"]) == 0
    result = json.loads(out.read_text())
    assert set(result["medians_s"]) == {"lm-dense", "lm-flat", "lm-dual"}  # the default presets
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
    assert result["e64_over_dense"] == pytest.approx(medians["scaling_E"]["moe_E64_K2"]
                                                     / medians["scaling_E"]["dense_F2x"])
    assert set(result["minor_faults_per_step"]) == {"moe_E64_K2", "moe_E8_K2", "dense_F2x"}
    assert all(v >= 0 for v in result["minor_faults_per_step"].values())
    w = medians["weights_E64"]
    assert result["e64_traffic_floor_over_dense"] == pytest.approx(
        1 + (w["weight_traffic_E64"] - w["weight_traffic_dense"]) / w["dense_F2x"])
    chunks = medians["chunks_E8"]
    assert result["one_pass_over_chunks_e8"] == pytest.approx(chunks["moe_E8_K2_one_pass"] / chunks["moe_E8_K2"])
    blocks = medians["blocks_E64"]  # on the CPU the opt-in padded blocks are timed too, in a round of their own
    assert set(blocks) == {"moe_E64_K2_blocks", "dense_F2x"}
    assert result["blocks_e64_over_dense"] == pytest.approx(blocks["moe_E64_K2_blocks"] / blocks["dense_F2x"])


@pytest.mark.skipif(sys.platform == "win32", reason="getrusage is POSIX")
def test_page_faults_count_the_pages_a_step_maps_afresh():
    import mmap

    def fresh_pages() -> None:  # a new anonymous mapping every call, written page by page: 2048 faults
        with mmap.mmap(-1, 8 * 2**20) as m:
            for i in range(0, len(m), mmap.PAGESIZE):
                m[i] = 1

    faults = page_faults([Contender("fresh", fresh_pages), Contender("none", lambda: None)], steps=2, warmup=1)
    assert faults["fresh"] >= 8 * 2**20 // mmap.PAGESIZE and faults["none"] < 64


def test_without_chunks_turns_the_cache_sized_chunks_off_for_its_step():
    seen = []
    without_chunks(lambda: seen.append(experts.CPU_CHUNK_MIN_BYTES))()
    assert seen == [float("inf")] and experts.CPU_CHUNK_MIN_BYTES == 48 * 2**20


def test_with_cpu_blocks_turns_the_cpu_padded_blocks_on_for_its_step():
    seen = []
    with_cpu_blocks(lambda: seen.append(experts.PADDED_DEVICE_TYPES))()
    assert "cpu" in seen[0] and "cuda" in seen[0]
    assert experts.PADDED_DEVICE_TYPES == ("cuda",)  # restored: the CPU's default is the loop


def test_header_names_allocator_and_threading_settings(monkeypatch):
    import dualroute.bench.common as common

    for name in [k for k in os.environ if k.startswith(TUNING_ENV)]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(common, "freed_memory_kept", lambda: {})
    assert describe_device(torch.device("cpu"), 2) == "cpu, 2 threads"
    assert device_setup(torch.device("cpu"), 2)["malloc"] == {}
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert describe_device(torch.device("cpu"), 2) == "cpu, 2 threads, MALLOC_MMAP_MAX_=0"
    assert device_setup(torch.device("cpu"), 2)["env"] == {"MALLOC_MMAP_MAX_": "0"}
    kept = {"mmap_threshold": 1 << 30, "trim_threshold": 2**31 - 1}
    monkeypatch.setattr(common, "freed_memory_kept", lambda: kept)
    assert describe_device(torch.device("cpu"), 2) == "cpu, 2 threads, malloc keeps freed memory, MALLOC_MMAP_MAX_=0"
    assert device_setup(torch.device("cpu"), 2)["malloc"] == kept


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"], ["--presets", ","],
                                  ["--presets", "lm-dense-small,digits-dual"]])
def test_bench_lm_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_lm(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err



TINY_LM = ["model.n_layers=1", "model.dim=16", "model.n_heads=2"]


def test_bench_generate(tmp_path, capsys, one_thread):
    out = tmp_path / "generate.json"
    assert run_generate(["--new-tokens", "3", "--prompt", "2", "--repeats", "1", "--threads", "1", "--json", str(out),
                         *TINY_LM]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds_per_token"]) == {"lm-dense", "lm-dual", "lm-dual (sort-based dispatch)"}
    assert result["setup"]["new_tokens"] == 3 and result["setup"]["device"] == "cpu"
    assert "ms/token" in capsys.readouterr().out


def test_bench_generate_times_the_per_layer_check_where_reads_are_not_free(monkeypatch, capsys, one_thread):
    monkeypatch.setattr(routing, "IMMEDIATE_CHECK_DEVICE_TYPES", ())  # as on a GPU: a host read is a sync,
    monkeypatch.setattr(layer_mod, "DIRECT_DEVICE_TYPES", ())  # and rows go through the dispatch
    seen = []
    real = routing._check_finite

    def spy(*args):
        seen.append(routing.IMMEDIATE_CHECK_DEVICE_TYPES)
        return real(*args)

    monkeypatch.setattr(routing, "_check_finite", spy)
    assert run_generate(["--new-tokens", "2", "--prompt", "2", "--repeats", "1", "--threads", "1", *TINY_LM]) == 0
    assert set(seen) == {(), ("cpu",)}  # deferred and per-layer contenders both ran
    assert routing.IMMEDIATE_CHECK_DEVICE_TYPES == ()  # restored after each step
    assert "lm-dual (check per layer)" in capsys.readouterr().out


def test_bench_generate_times_the_sort_based_dispatch_on_the_cpu(monkeypatch, one_thread):
    calls = []
    real = layer_mod.plan_dispatch
    monkeypatch.setattr(layer_mod, "plan_dispatch", lambda *a, **k: calls.append(layer_mod.DIRECT_MAX_ROWS) or real(*a, **k))
    assert run_generate(["--new-tokens", "2", "--prompt", "8", "--repeats", "1", "--threads", "1",
                         "--presets", "lm-dense-small,lm-dual-small", *TINY_LM]) == 0
    # 8-token prompts (K=2: 16 rows) take the dispatch in both rows; only the "before" row decodes through it too
    assert set(calls) == {layer_mod.DIRECT_MAX_ROWS, 0}
    assert calls.count(layer_mod.DIRECT_MAX_ROWS) == calls.count(0) // 2
    assert layer_mod.DIRECT_MAX_ROWS > 0  # restored


@pytest.mark.parametrize("argv,message", [
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--prompt", "100", "--new-tokens", "29"], "--prompt + --new-tokens = 129 exceeds lm-dense's max_seq_len (128)"),
    (["--presets", ","], "--presets names no preset"),
    (["--presets", "digits-dual"], "'digits-dual' is an image classifier"),
])
def test_bench_generate_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        run_generate(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --device / --dtype


def test_bench_layer_bfloat16(tmp_path, capsys, one_thread):
    out = tmp_path / "layer.json"
    assert run_layer(["--tokens", "8", "--dim", "16", "--hidden", "32", "--repeats", "1", "--decode-repeats", "1",
                      "--threads", "1", "--device", "cpu", "--dtype", "bfloat16", "--json", str(out)]) == 0
    setup = json.loads(out.read_text())["setup"]
    assert (setup["device"], setup["dtype"], setup["threads"]) == ("cpu", "bfloat16", 1)
    assert "T=8 D=16 F=32 bfloat16, cpu, 1 threads" in capsys.readouterr().out


def test_bench_lm_bfloat16_autocast(tmp_path, capsys, one_thread):
    out = tmp_path / "lm.json"
    assert run_lm(["--repeats", "1", "--threads", "1", "--dtype", "bfloat16", "--parts", "--json", str(out),
                   "--presets", "lm-dense-small,lm-dual-small", "model.n_layers=1", "train.batch_size=2", "train.seq_len=8"]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["dtype"] == "bfloat16" and result["setup"]["device"] == "cpu"
    assert result["setup"]["precision"] == "bfloat16 autocast (float32 weights)"
    assert set(result["parts_s"]["lm-dual-small"]) == STAGES
    assert "bfloat16 autocast (float32 weights), cpu, 1 threads" in capsys.readouterr().out


def test_bench_lm_autocast_is_used():
    """The LM's forward runs under autocast to --dtype (its weights stay float32), and without it for float32."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 3))

        def forward(self, idx):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return SimpleNamespace(logits=torch.ones(*idx.shape, 3) @ self.w, aux=[])

    idx = torch.zeros(1, 4, dtype=torch.long)
    lm_train_step(Probe(), idx, torch.bfloat16)()
    lm_train_step(Probe(), idx)()
    assert seen[0] == (True, torch.bfloat16) and seen[1][0] is False


def test_time_alternating_synchronizes_around_each_step():
    events = []
    contenders = [Contender(name, lambda name=name: events.append(name)) for name in ("a", "b")]
    medians = time_alternating(contenders, repeats=2, warmup=1, sync=lambda: events.append("sync"))
    assert set(medians) == {"a", "b"}
    assert events == ["sync", "a", "sync", "sync", "b", "sync"] * 3
    assert synchronizer(torch.device("cpu")) is None


BAD_DEVICE_ARGS = [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "cuda:99"], "device 'cuda:99' is not available"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--dtype", "float8"], "unknown dtype 'float8'; expected one of float32, bfloat16, float16"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
]


@pytest.mark.parametrize("run", [run_layer, run_lm, run_generate, bench_hf.main], ids=["layer", "lm", "generate", "hf"])
@pytest.mark.parametrize("argv,message", BAD_DEVICE_ARGS)
def test_bad_device_or_dtype_is_a_usage_error(run, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: {message}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("run", [run_layer, run_lm, run_generate, bench_hf.main], ids=["layer", "lm", "generate", "hf"])
def test_cuda_without_cuda_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit) as info:
        run(["--device", "cuda"])
    assert info.value.code == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err


def pretend_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_bench_hf_peak_size_default_follows_the_device(monkeypatch):
    assert bench_hf._parse([]).peak_size == 2048
    assert bench_hf._parse(["--peak-size", "64"]).peak_size == 64
    pretend_cuda(monkeypatch)
    args = bench_hf._parse(["--device", "cuda", "--dtype", "bfloat16"])
    assert (args.device, args.dtype, args.peak_size) == (torch.device("cuda"), torch.bfloat16, 8192)


def test_bench_hf_profile_needs_the_cpu(monkeypatch, capsys):
    pretend_cuda(monkeypatch)
    with pytest.raises(SystemExit) as info:
        bench_hf._parse(["--device", "cuda", "--profile"])
    assert info.value.code == 2
    assert "--profile measures self CPU time and needs --device cpu, got --device cuda" in capsys.readouterr().err


TINY_HF = ["--tokens", "1,4", "--dim", "16", "--hidden", "32", "--experts", "4", "--budget", "0.01",
           "--peak-size", "32"]


def test_bench_hf_bfloat16(tmp_path, capsys, one_thread):
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    assert bench_hf.main([*TINY_HF, "--dtype", "bfloat16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"], result["peak_matmul_size"]) == ("cpu", "bfloat16", 32)
    assert "K=2 bfloat16, cpu, 1 threads" in result["header"] and "(32x32 bfloat16" in result["header"]
    timed = [r for r in result["records"] if r["median_ms"] is not None]
    assert len(timed) == 2 * 2 * 4
    assert all(r["max_abs_diff_vs_dualroute"] < 0.05 for r in timed)  # same weights, bfloat16 rounding
    assert "bfloat16" in capsys.readouterr().out


def test_bench_hf_failing_contender_is_reported_and_the_rest_run(tmp_path, monkeypatch, capsys, one_thread):
    pytest.importorskip("transformers")
    build = bench_hf._contenders

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this dtype\non this device")

    def with_broken_eager(args):
        blocks = build(args)
        blocks["hf-eager"] = Broken()
        return blocks

    monkeypatch.setattr(bench_hf, "_contenders", with_broken_eager)
    out = tmp_path / "hf.json"
    assert bench_hf.main([*TINY_HF, "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    eager = [r for r in records if r["contender"] == "hf-eager"]
    assert len(eager) == 4 and all(r["median_ms"] is None for r in eager)
    assert all(r["note"] == "failed: no kernel for this dtype on this device" for r in eager)
    assert all(r["median_ms"] is not None for r in records if r["contender"] != "hf-eager")
    assert "hf-eager failed: no kernel" in capsys.readouterr().out


def test_bench_presets_resize_the_dense_twin_with_the_moe():
    """model.moe.* overrides reach the dense twin's dense_twin_of, so bench lm keeps active sizes equal."""
    import argparse

    from dualroute.bench.common import preset_configs
    from dualroute.models import param_counts
    from dualroute.train.tasks import make_task

    configs = preset_configs(argparse.ArgumentParser(), "lm-dense-small,lm-flat-small", ["model.moe.hidden=64", "model.dim=64"])
    dense, flat = configs["lm-dense-small"].model, configs["lm-flat-small"].model
    assert dense.dense_twin_of.hidden == flat.moe.hidden == 64 and dense.dim == dense.dense_twin_of.dim == 64
    active = {n: param_counts(make_task(c).build_model())[1] for n, c in configs.items()}
    assert active["lm-flat-small"] - active["lm-dense-small"] == flat.moe.num_experts * (64 + 1) * flat.n_layers  # the routers
