"""Models trained by ``dualroute train`` load in transformers (``dualroute convert RUN OUT --to hf``).

Tiny runs (2 steps) of lm-dual-small, lm-flat-small and lm-dense-small export in the custom-code format; lm-flat-small with a
bias-free router and no correction biases as a native Mixtral, and with a gated shared expert, a dense
first layer and unnormalised routing weights as a native Qwen2-MoE. Float32, eval mode: transformers'
logits equal dualroute's within 1e-5, greedy generation (with transformers' KV cache) gives the same ids,
and ``--to dualroute`` gives back the same tensors. Everything is read from local folders: the Hub is
never asked (``local_files_only``, HF_HUB_OFFLINE) and remote code is cached in a temporary folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason='export tests need transformers: pip install "dualroute[hf]"')

from test_trainer import tiny_lm  # noqa: E402

from dualroute.data import BPETokenizer, ByteTokenizer, CharTokenizer, default_corpus, load_tokenizer  # noqa: E402
from dualroute.interop import load_dualroute  # noqa: E402
from dualroute.interop.cli_hooks import convert_main  # noqa: E402
from dualroute.interop.export import read_run  # noqa: E402
from dualroute.interop.hf_tokenizer import write_hf_tokenizer  # noqa: E402
from dualroute.interop.native import lm_to_arch_state, mismatches  # noqa: E402
from dualroute.models import TransformerLM  # noqa: E402
from dualroute.train.checkpoint import load_weights, save_checkpoint  # noqa: E402
from dualroute.train.presets import get_preset, override, run_config_to_dict  # noqa: E402
from dualroute.train.tasks import tokenizer_record  # noqa: E402
from dualroute.train.trainer import load_run, train  # noqa: E402

ATOL = 1e-5
MIXTRAL = ["model.moe.router.bias=false", "model.moe.router.correction_bias=false"]
QWEN2_MOE = [*MIXTRAL, "model.moe.num_shared_experts=1", "model.moe.shared_gate=true",
             "model.moe.router.renormalize=false", "model.dense_first=1"]
RUNS = {  # name: (preset, extra overrides)
    "lm-dual-small": ("lm-dual-small", []),
    "lm-flat-small": ("lm-flat-small", []),
    "lm-dense-small": ("lm-dense-small", []),
    "mixtral": ("lm-flat-small", MIXTRAL),
    "qwen2_moe": ("lm-flat-small", QWEN2_MOE),
}
NATIVE = {"mixtral": transformers.MixtralForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM}
CUSTOM = ["lm-dual-small", "lm-flat-small", "lm-dense-small"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _local_only(tmp_path_factory):
    """transformers copies remote code into its modules cache (~/.cache/huggingface/modules): use a temporary one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        mp.setattr(sys, "path", list(sys.path))  # transformers appends its modules cache to sys.path
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories of 2-step tiny runs, one per entry of RUNS."""
    root = tmp_path_factory.mktemp("runs")
    for name, (preset, extra) in RUNS.items():
        train(tiny_lm(root / name, "train.steps=2", "train.eval_every=0", *extra, preset=preset), progress=False)
    return {name: root / name for name in RUNS}


def dualroute_model(run_dir: Path) -> TransformerLM:
    run = read_run(run_dir)
    model = TransformerLM(run.model)
    model.load_state_dict(run.state)
    return model.eval()


def load_hf(folder: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw).eval()


def prompt(B: int = 2, S: int = 5, V: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def export(run_dir: Path, out: Path, capsys) -> str:
    assert convert_main([str(run_dir), str(out), "--to", "hf"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    return printed[0]


def assert_same_as_dualroute(hf, ours: TransformerLM) -> None:
    """Logits within ATOL on a batch, and greedy generation of 8 tokens with the KV cache gives the same ids."""
    idx = prompt(S=11)
    with torch.no_grad():
        got, want = hf(idx).logits, ours(idx).logits
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    want_ids = ours.generate(idx[:, :4], 8, temperature=0)
    got_ids = hf.generate(idx[:, :4], max_new_tokens=8, do_sample=False)
    assert got_ids.tolist() == want_ids.tolist()


# ------------------------------------------------------------------------------------------- custom code


@pytest.mark.parametrize("name", CUSTOM)
def test_custom_code_export_loads_and_matches(runs, name, tmp_path, capsys):
    out = tmp_path / "hf"
    line = export(runs[name], out, capsys)
    assert line.startswith(f"wrote {out}: custom-code checkpoint") and "no native family fits: " in line
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dualroute"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dualroute.DualrouteForCausalLM"
    for file in ("configuration_dualroute.py", "modeling_dualroute.py", "model.safetensors", "tokenizer.json"):
        assert (out / file).is_file(), file
    assert "pip install dualroute" in (out / "README.md").read_text()
    modeling = (out / "modeling_dualroute.py").read_text()
    assert "imports the ``dualroute`` package (``pip install dualroute``)" in modeling

    hf = load_hf(out, trust_remote_code=True)
    assert type(hf).__name__ == "DualrouteForCausalLM" and isinstance(hf, transformers.GenerationMixin)
    assert_same_as_dualroute(hf, dualroute_model(runs[name]))


def test_custom_code_generate_uses_transformers_cache(runs, tmp_path, capsys):
    export(runs["lm-dual-small"], tmp_path / "hf", capsys)
    hf = load_hf(tmp_path / "hf", trust_remote_code=True)
    ours = dualroute_model(runs["lm-dual-small"])  # routed experts keep dualroute's memory layout (exact matmuls)
    assert hf.model.blocks[0].ffn.experts.w13.stride() == ours.blocks[0].ffn.experts.w13.stride()
    lengths = []
    hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    idx = prompt(S=4)
    with_cache = hf.generate(idx, max_new_tokens=6, do_sample=False)
    assert lengths == [4] + [1] * 5  # the prompt once, then one new token per step
    no_cache = hf.generate(idx, max_new_tokens=6, do_sample=False, use_cache=False)
    assert no_cache.tolist() == with_cache.tolist()

    out = hf(idx, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length() == 4
    step = hf(with_cache[:, 4:5], cache=cache)  # continue from the cache
    full = hf(with_cache[:, :5], use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=ATOL, rtol=0)


def test_custom_code_refuses_padding_and_computes_the_training_loss(runs, tmp_path, capsys):
    export(runs["lm-dual-small"], tmp_path / "hf", capsys)
    hf = load_hf(tmp_path / "hf", trust_remote_code=True)
    idx = prompt(S=6)
    with pytest.raises(ValueError, match="padded batches"):
        hf(idx, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="position"):
        hf(idx, position_ids=torch.arange(1, 7)[None])
    out = hf(idx, labels=idx)
    ours = dualroute_model(runs["lm-dual-small"])(idx)
    ce = torch.nn.functional.cross_entropy(ours.logits[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1))
    assert len(ours.aux) == 2
    torch.testing.assert_close(out.loss, ce + sum(a.loss for a in ours.aux))


def test_custom_code_round_trip_is_exact(runs, tmp_path, capsys):
    export(runs["lm-dual-small"], tmp_path / "hf", capsys)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "dualroute"]) == 0
    assert "training checkpoint" in capsys.readouterr().out
    original, back = read_run(runs["lm-dual-small"]), load_weights(tmp_path / "back")
    assert back.model_state.keys() == original.state.keys()
    for name, tensor in original.state.items():
        assert torch.equal(back.model_state[name], tensor), name
    assert back.extra["config"] == run_config_to_dict(original.config)
    assert back.extra["tokenizer"] == original.tokenizer and back.extra["step"] == 2
    task, model, _ = load_run(tmp_path / "back")  # what dualroute generate / eval read
    assert task.tokenizer.encode("ab") == [97, 98]
    assert all(torch.equal(p, original.state[n]) for n, p in model.state_dict().items())


# ------------------------------------------------------------------------------------------- native Mixtral


def test_no_preset_is_native_and_the_overrides_are(runs):
    flat = mismatches(get_preset("lm-flat-small").model)
    assert flat["mixtral"] == ["the router has a bias (model.moe.router.bias=true)"]
    assert flat["qwen2_moe"] == flat["mixtral"] + [
        "no sigmoid-gated shared expert (model.moe.num_shared_experts>=1 with model.moe.shared_gate=true)"]
    assert "two-level routing (model.moe.num_groups=4)" in mismatches(get_preset("lm-dual-small").model)["mixtral"]
    assert mismatches(get_preset("lm-dense-small").model)["qwen2_moe"] == ["the model is dense (no MoE layers)"]
    mixtral = mismatches(override(get_preset("lm-flat-small"), MIXTRAL).model)
    assert mixtral["mixtral"] == [] and mixtral["qwen2_moe"] != []
    qwen = mismatches(override(get_preset("lm-flat-small"), QWEN2_MOE).model)
    assert qwen["qwen2_moe"] == [] and len(qwen["mixtral"]) == 3  # shared expert, dense layer, not renormalised
    trained = read_run(runs["lm-flat-small"])  # balancing moved lm-flat-small's correction biases
    assert any("correction biases are non-zero" in w for w in mismatches(trained.model, trained.state)["mixtral"])


@pytest.mark.parametrize("change, reason", [
    ("model.moe.num_groups=2", "two-level routing"),
    ("model.moe.router.score_func=sigmoid", "score_func='sigmoid'"),
    ("model.moe.expert_kind=mlp", "not bias-free SwiGLU"),
    ("model.moe.expert_bias=true", "not bias-free SwiGLU"),
    ("model.moe.router.scaling_factor=2.0", "scaling_factor=2.0"),
    ("model.moe.router.noisy_gating=true", "noisy gating"),
    ("model.moe.eval_capacity_factor=1.0", "capacity factor"),
    ("model.dropout=0.1", "model.dropout=0.1"),
])
def test_every_difference_from_both_families_is_named(change, reason):
    why = mismatches(override(get_preset("lm-flat-small"), [*QWEN2_MOE, change]).model)
    assert any(reason in w for w in why["qwen2_moe"]) and any(reason in w for w in why["mixtral"]), why


@pytest.mark.parametrize("family", list(NATIVE))
def test_native_export_loads_in_stock_transformers(runs, family, tmp_path, capsys):
    out = tmp_path / "hf"
    line = export(runs[family], out, capsys)
    assert line == f"wrote {out}: native transformers {family} checkpoint (no custom code needed)"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert config["eos_token_id"] is None and config["tie_word_embeddings"] is True
    assert not list(out.glob("*.py"))
    hf = load_hf(out)  # no trust_remote_code
    assert type(hf) is NATIVE[family]
    assert_same_as_dualroute(hf, dualroute_model(runs[family]))


@pytest.mark.parametrize("family", list(NATIVE))
def test_native_round_trip_is_exact(runs, family, tmp_path, capsys):
    export(runs[family], tmp_path / "hf", capsys)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "dualroute"]) == 0
    trained = read_run(runs[family])
    want = lm_to_arch_state(trained.model, trained.state)
    back = load_dualroute(tmp_path / "back")
    got = back.state_dict()
    assert {k for k in got if k != "head.weight"} == set(want)  # the head is tied to the embedding
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    idx = prompt(S=11)
    with torch.no_grad():  # and it is the same model, run by dualroute's implementation of the family
        torch.testing.assert_close(back(idx).logits, dualroute_model(runs[family])(idx).logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizer_json_encodes_and_decodes_as_dualroute(kind, tmp_path):
    text = default_corpus()[:5000]
    tok = {"byte": ByteTokenizer(), "char": CharTokenizer.from_text(text), "bpe": BPETokenizer.train(text, 300)}[kind]
    write_hf_tokenizer(tokenizer_record(tok), tmp_path, model_max_length=64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for sample in (text[:500], "héllo wörld\n\t  日本 ☃ <unk> \ufffd end"):  # unseen characters for char
        ids = tok.encode(sample)
        assert hf(sample).input_ids == ids
        assert hf.decode(ids) == tok.decode(ids)
    ids = [104 % tok.vocab_size, 195 % tok.vocab_size, tok.vocab_size - 1]  # byte: "h", a cut character
    assert hf.decode(ids) == tok.decode(ids)
    assert kind == "bpe" or tok.decode(ids).endswith("\ufffd")  # char: the unknown id


def test_exported_folder_tokenizer_is_the_runs(runs, tmp_path, capsys):
    export(runs["lm-dense-small"], tmp_path / "hf", capsys)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True, trust_remote_code=True)
    assert tok("é!").input_ids == list("é!".encode())
    assert load_tokenizer(tmp_path / "hf" / "dualroute_tokenizer.json").encode("é!") == list("é!".encode())


# ------------------------------------------------------------------------------------------- errors


def test_convert_reports_bad_runs(runs, tmp_path, capsys):
    def fails(src, *args: str) -> str:
        assert convert_main([str(src), str(tmp_path / "out"), *args]) == 2
        return capsys.readouterr().err

    assert f"no such folder: {tmp_path / 'missing'}" in fails(tmp_path / "missing", "--to", "hf")
    bare = tmp_path / "bare-run"  # a run that never saved a checkpoint
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(run_config_to_dict(get_preset("lm-dual-small"))))
    assert f"{bare} holds no checkpoint" in fails(bare, "--to", "hf")
    image = tmp_path / "image-run" / "ckpt-00000001"
    save_checkpoint(image, model_state={}, extra={"config": run_config_to_dict(get_preset("digits-dual"))}, rng=False)
    err = fails(image.parent, "--to", "hf")
    assert str(image) in err and "model is an ImageConfig" in err
    assert "is a dualroute training run already" in fails(runs["lm-flat-small"], "--to", "dualroute")
    export(runs["lm-flat-small"], tmp_path / "hf", capsys)
    assert "already a transformers export" in fails(tmp_path / "hf", "--to", "hf")
    assert convert_main([str(runs["lm-flat-small"]), str(runs["lm-flat-small"]), "--to", "hf"]) == 2
    assert "is the source folder" in capsys.readouterr().err
