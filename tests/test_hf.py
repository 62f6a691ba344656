"""Hugging Face interop: tiny random Mixtral / Qwen2-MoE / DeepSeek-V3 / OLMoE models built by transformers
itself, saved with ``save_pretrained``, loaded into dualroute, and compared with transformers' own forward.

Float32, eval mode: logits within 1e-4, greedy generation identical, dualroute -> HF -> transformers and
the drop-in swap give the same logits; every bad input fails with a message naming what is wrong.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason='HF interop tests need transformers: pip install "dualroute[hf]"')

from dualroute.experts import Experts  # noqa: E402
from dualroute.interop import load_dualroute, load_hf, save_dualroute, save_hf, swap_moe_blocks  # noqa: E402
from dualroute.bench import hf as bench_hf  # noqa: E402
from dualroute.interop.cli_hooks import convert_main, generate_hf_main  # noqa: E402
from dualroute.layer import MoELayer  # noqa: E402

V = 61  # vocabulary
ATOL = 1e-4

COMMON = dict(vocab_size=V, hidden_size=16, num_attention_heads=4, eos_token_id=None, bos_token_id=None,
              pad_token_id=None, max_position_embeddings=128)
CASES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=8, num_hidden_layers=2, num_key_value_heads=2,
                                      num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-window-tied-top1": ("MixtralConfig", dict(intermediate_size=12, num_hidden_layers=2, num_key_value_heads=4,
                                                       num_local_experts=3, num_experts_per_tok=1, sliding_window=5,
                                                       tie_word_embeddings=True)),
    "qwen2_moe-sparse-step": ("Qwen2MoeConfig", dict(
        intermediate_size=20, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_hidden_layers=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3],
        norm_topk_prob=False)),
    "qwen2_moe-norm-window": ("Qwen2MoeConfig", dict(
        intermediate_size=20, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_hidden_layers=2,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[],
        use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "deepseek_v3-groups": ("DeepseekV3Config", dict(
        intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=6, rope_interleave=True)),
    "deepseek_v3-lora-yarn": ("DeepseekV3Config", dict(
        intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2, num_key_value_heads=4,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=0,
        n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.7, kv_lora_rank=6, q_lora_rank=10,
        qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=4, rope_interleave=False, attention_bias=True,
        max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 16, "mscale": 1.0,
                                                     "mscale_all_dim": 0.8})),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=8, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False)),
    "olmoe-clip-gqa": ("OlmoeConfig", dict(intermediate_size=8, num_hidden_layers=1, num_key_value_heads=2,
                                           num_experts=5, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=0.6,
                                           attention_bias=True)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(case: str, **overrides):
    cls, kw = CASES[case]
    return getattr(transformers, cls)(**{**COMMON, **kw, **overrides})


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that routing is decisive, and a non-zero DeepSeek correction bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.25 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, its save_pretrained folder), built once per case."""
    cache = {}

    def get(case: str):
        if case not in cache:
            torch.manual_seed(0)
            model = randomise(transformers.AutoModelForCausalLM.from_config(hf_config(case)))
            folder = tmp_path_factory.mktemp(case)
            model.save_pretrained(folder)
            cache[case] = (model, folder)
        return cache[case]

    return get


def tokens(B: int = 2, S: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits.float()


def ours_logits(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(saved, case):
    hf, folder = saved(case)
    ours = load_hf(folder)
    idx = tokens()
    torch.testing.assert_close(ours_logits(ours, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)
    n_moe = sum(isinstance(m, MoELayer) for m in ours.modules())
    assert n_moe == sum(ours.cfg.moe_layers) > 0


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches(saved, case):
    hf, folder = saved(case)
    ours = load_hf(folder)
    prompt = tokens(1, 5, seed=3)
    want = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    got = ours.generate(prompt, 20)
    assert got.shape == (1, 25)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_hf_format(saved, case, tmp_path):
    hf, folder = saved(case)
    save_hf(load_hf(folder), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = tokens()
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_drop_in_swap(saved, case):
    hf, _ = saved(case)
    swapped = copy.deepcopy(hf)
    names = swap_moe_blocks(swapped)
    assert len(names) == sum(load_arch_moe_layers(hf))
    idx = tokens()
    with torch.no_grad():
        want = hf(idx, output_router_logits=True)
        got = swapped(idx, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    if hasattr(want, "router_logits"):  # DeepSeek-V3 reports none in some transformers releases (5.17)
        assert len(got.router_logits) == len(want.router_logits) == len(names)  # hooks still see the router
    for module in swapped.modules():  # the loaded weights keep the routed experts' out-major storage
        if isinstance(module, Experts) and module.cfg.num_experts > 1:
            assert all(w.stride(1) == 1 for w in (module.first_weight(), module.w2))
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-5, rtol=0)


def load_arch_moe_layers(hf) -> tuple[bool, ...]:
    from dualroute.interop import arch_from_hf

    return arch_from_hf(hf.config.to_dict()).moe_layers


def test_drop_in_swap_backward_matches(saved):
    hf, _ = saved("mixtral")
    hf = copy.deepcopy(hf)
    swapped = copy.deepcopy(hf)
    swap_moe_blocks(swapped)
    idx = tokens()
    grads = []
    for model in (hf, swapped):
        model.zero_grad()
        model(idx, labels=idx).loss.backward()
        grads.append(model.model.embed_tokens.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ layouts


def test_sharded_checkpoint_both_ways(saved, tmp_path):
    hf, _ = saved("qwen2_moe-sparse-step")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "back", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = tokens()
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_logits(load_hf(tmp_path / "back"), idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3-groups"])
def test_fused_expert_layout_loads(saved, case, tmp_path):
    """transformers 5 keeps experts fused in memory (``experts.gate_up_proj``); a file of that state dict loads."""
    from safetensors.torch import save_file

    hf, folder = saved(case)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or
             not hf.config.tie_word_embeddings}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    idx = tokens()
    torch.testing.assert_close(ours_logits(load_hf(tmp_path), idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


def test_dualroute_checkpoint_round_trip(saved, tmp_path):
    hf, folder = saved("deepseek_v3-groups")
    save_dualroute(load_hf(folder), tmp_path / "dr")
    ours = load_dualroute(tmp_path / "dr")
    assert ours.layers[1].ffn.router.expert_bias_E.abs().sum() > 0  # the correction bias came along
    idx = tokens()
    torch.testing.assert_close(ours_logits(ours, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


def test_fp8_block_quantised_weights_are_dequantised(saved, tmp_path):
    """DeepSeek-V3's release stores projections in float8 with one ``weight_scale_inv`` per block."""
    hf, folder = saved("deepseek_v3-groups")
    block = 4

    def quantise(tensors):
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            w = tensors[name]
            tiles = w.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # (rows/b, b, cols/b, b)
            scale = tiles.abs().amax(dim=(1, 3)) / 448
            q = (tiles / scale[:, None, :, None]).flatten(2).flatten(0, 1).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, scale

    _rewrite(folder, tmp_path, quantise)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_hf(tmp_path, dtype=torch.float32)
    w13 = ours.layers[1].ffn.experts.w13[0]
    want = hf.model.layers[1].mlp.experts.gate_up_proj[0].t()
    torch.testing.assert_close(w13, want, atol=0.03, rtol=0.07)  # e4m3 keeps 3 mantissa bits
    save_hf(ours, tmp_path / "back")
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_bf16_load_runs(saved):
    hf, folder = saved("olmoe")
    ours = load_hf(folder, dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert ours.layers[0].ffn.router.gate.weight.dtype == torch.float32  # routing stays float32
    logits = ours_logits(ours, tokens())
    assert torch.isfinite(logits).all()
    assert (logits - hf_logits(hf, tokens())).abs().max() < 0.5


# ------------------------------------------------------------------------------------------ entry points


def test_convert_main_both_directions(saved, tmp_path, capsys):
    hf, folder = saved("mixtral")
    assert convert_main([str(folder), str(tmp_path / "dr"), "--to", "dualroute"]) == 0
    assert (tmp_path / "dr" / "meta.json").is_file()
    assert convert_main([str(tmp_path / "dr"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = tokens()
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)
    for path in (folder, tmp_path / "dr"):  # generate reads either format
        assert generate_hf_main(["--hf", str(path), "--prompt-ids", "5,6", "--max-new-tokens", "4"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and first.startswith("ids: 5,6,")


def test_generate_hf_main_prints_greedy_ids(saved, tmp_path, capsys):
    hf, folder = saved("olmoe")
    want = hf.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=6, do_sample=False)[0].tolist()
    assert generate_hf_main(["--hf", str(folder), "--prompt-ids", "3,1,4", "--max-new-tokens", "6",
                             "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == "ids: " + ",".join(map(str, want))
    assert generate_hf_main(["--hf", str(folder), "--prompt-ids", "3,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert generate_hf_main(["--hf", str(folder), "--prompt", "hello"]) == 2  # no tokenizer.json
    assert "tokenizer.json" in capsys.readouterr().err


def test_generate_stops_at_eos_like_transformers(tmp_path):
    torch.manual_seed(0)
    hf = randomise(transformers.AutoModelForCausalLM.from_config(hf_config("mixtral")))
    prompt = tokens(1, 4, seed=5)
    free = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0]
    eos = int(free[8])  # a token greedy decoding produces: make it the end token
    hf.generation_config.eos_token_id = eos
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    hf.save_pretrained(tmp_path)
    got = load_hf(tmp_path).generate(prompt, 12, eos_token_id=eos)
    assert torch.equal(got, want)


def test_bench_hf_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_hf.main(["--tokens", "1,5", "--dim", "16", "--hidden", "8", "--experts", "4", "--budget", "0.01",
                          "--peak-size", "256", "--json", str(out)]) == 0
    assert "dualroute" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert {r["contender"] for r in records} == {"hf-eager", "hf-batched_mm", "hf-grouped_mm", "dualroute"}
    assert all(r["max_abs_diff_vs_dualroute"] < 1e-5 for r in records if r["median_ms"] is not None)


TINY_BENCH = ["--dim", "16", "--hidden", "32", "--budget", "0.05", "--peak-size", "256"]


def test_bench_hf_roofline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_hf.main(["--tokens", "1,4", *TINY_BENCH, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hf-grouped_mm % of peak" in printed and "max possible speedup over hf-grouped_mm" in printed
    assert "Fastest possible forward+backward" in printed and "matmul share" not in printed  # --profile is off
    result = json.loads(out.read_text())
    peak = result["peak_gflops"]
    assert peak > 0 and peak == max(result["peak_gflops_before"], result["peak_gflops_after"])
    timed = [r for r in result["records"] if r["median_ms"] is not None]
    assert len(timed) == 2 * 2 * 4  # T values x modes x contenders, none skipped at this size
    for r in timed:
        assert r["expert_gflop"] == bench_hf.moe_flops(r["T"], 16, 32, 8, 2, r["mode"]) / 1e9
        assert r["gflops"] > 0 and r["peak_fraction"] > 0
        assert r["gflops"] == pytest.approx(r["expert_gflop"] / (r["median_ms"] / 1e3))
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak)
        assert r["matmul_share"] is None


def test_bench_hf_profile_reports_matmul_share(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_hf.main(["--tokens", "8", *TINY_BENCH, "--profile", "--json", str(out)]) == 0
    assert "dualroute matmul share" in capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 * 4
    assert all(0 < r["matmul_share"] <= 1 for r in records)


def test_bench_hf_moe_flops_hand_count():
    # T=2, D=3, F=5, E=4, K=2: router 2*2*3*4 = 48; experts 2 * (2*2 rows) * 3 matmuls * 3*5 = 360
    assert bench_hf.moe_flops(2, 3, 5, 4, 2, "forward") == 408
    assert bench_hf.moe_flops(2, 3, 5, 4, 2, "forward+backward") == 3 * 408
    assert bench_hf.moe_flops(1, 1, 1, 1, 1, "forward") == 2 + 6
    with pytest.raises(ValueError, match="mode must be one of"):
        bench_hf.moe_flops(2, 3, 5, 4, 2, "backward")


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget must be finite and > 0 seconds, got 0.0"),
    (["--budget", "-1"], "--budget must be finite and > 0 seconds, got -1.0"),
    (["--budget", "nan"], "--budget must be finite and > 0 seconds, got nan"),
    (["--tokens", "1,x"], "expected comma-separated integers, got '1,x'"),
    (["--tokens", "0,4"], "--tokens must list integers >= 1, got [0, 4]"),
    (["--top-k", "3", "--experts", "2"], "--top-k must be <= --experts (2), got 3"),
    (["--peak-size", "0"], "--peak-size must be >= 1, got 0"),
    (["--batched-mm-max-gib", "-1"], "--batched-mm-max-gib must be >= 0, got -1.0"),
])
def test_bench_hf_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_hf.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_importing_dualroute_does_not_import_transformers():
    code = "import sys, dualroute, dualroute.interop; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ bad input


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_unsupported_model_type_lists_supported(saved, tmp_path):
    _, folder = saved("mixtral")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*mixtral, qwen2_moe, deepseek_v3, olmoe"):
        load_hf(tmp_path)


def test_invalid_json_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(hf_config("olmoe").to_json_string())
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_hf(tmp_path)


def _rewrite(folder: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    dst.mkdir(exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((folder / "config.json").read_text())
    return dst


def test_missing_tensor_names_it_and_its_shape(saved, tmp_path):
    _, folder = saved("qwen2_moe-sparse-step")
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    _rewrite(folder, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"tensor '{name}' is missing \(expected shape \(16, 8\) = "
                                         r"\(hidden_size, moe_intermediate_size\)"):
        load_hf(tmp_path)


def test_misshaped_tensor_names_file_tensor_and_shape(saved, tmp_path):
    _, folder = saved("deepseek_v3-groups")
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    _rewrite(folder, tmp_path, lambda t: t.update({name: torch.zeros(5)}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{name}' has shape \(5,\), expected shape "
                                         r"\(8,\) = \(n_routed_experts,\)"):
        load_hf(tmp_path)


def test_config_that_disagrees_with_the_weights(saved, tmp_path):
    _, folder = saved("mixtral")
    config = json.loads((folder / "config.json").read_text())
    _rewrite(folder, tmp_path, lambda t: None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(ValueError, match=r"block_sparse_moe.gate.weight' has shape \(4, 16\), expected shape "
                                         r"\(8, 16\) = \(num_local_experts, hidden_size\)"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"tensor\(s\) that the model described by .*config.json does not have: "
                                         r"'model.layers.1"):
        load_hf(tmp_path)


def test_bad_config_values(saved, tmp_path):
    _, folder = saved("olmoe")
    config = json.loads((folder / "config.json").read_text())
    _rewrite(folder, tmp_path, lambda t: None)
    for bad, message in [({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
                         ({"num_experts_per_tok": 9}, "experts_per_token"),
                         ({"hidden_size": None}, "missing 'hidden_size'"),
                         ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "unsupported rope type")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path)


def test_convert_main_reports_bad_input(tmp_path, capsys):
    assert convert_main([str(tmp_path), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert convert_main([str(tmp_path), str(tmp_path / "out")]) == 2  # --to is required (argparse usage error)


def test_swap_rejects_other_models():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        swap_moe_blocks(llama)
