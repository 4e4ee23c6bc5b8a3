"""What train_sst.py and train_mnli.py share: the frozen biLM's features (the layer cache, the token
features [ELMo_k; x_k]), the task BiLSTM encoder, pooling and the optimizer."""
from __future__ import annotations

import os
import shutil
import time

import torch
import torch.nn as nn

from data import PAD_ID, batch_to_ids
from elmo import PRESETS, BiLM, ELMoConfig, ElmoEmbedder, length_mask, load_elmo
from runtime import UserError


# ---------------------------------------------------------------------------------------------------------
# Downstream building blocks shared by train_sst.py and train_mnli.py
# ---------------------------------------------------------------------------------------------------------
class LayerCache:
    """The frozen biLM's layers for every distinct sentence a run will see, computed once before training.

    The biLM is frozen, so its layers are the same every epoch: computing them again is waste. This runs it
    once over the distinct sentences (sorted by length, up to `batch_tokens` tokens a batch: little padding,
    large matrix products) and stores them row by row: a sentence of n tokens owns rows
    [offset, offset + n + 2) of `rows`, each row (L+1, 2P), <S> and </S> included.

    In memory the rows are fp32: what the biLM gives (to float rounding, as batches differ; padding cannot
    leak, see test_padding_invariance). With `path` they go to a memory-mapped
    fp16 file instead: half the bytes, paged in and out by the OS, for data whose layers exceed RAM (the
    mix and the task model then see the layers rounded to fp16, about 3 significant digits)."""

    def __init__(self, elmo: ElmoEmbedder, sentences, path: str | None = None, batch_tokens: int = 8000,
                 log=None):
        unique = sorted({tuple(s) for s in sentences}, key=len)
        self.offsets, n_rows = {}, 0
        for s in unique:
            self.offsets[s] = n_rows
            n_rows += len(s) + 2
        shape = (n_rows, len(elmo.mixes[0].weights), elmo.output_dim)           # (rows, L+1, 2P)
        if path is None:
            self.rows = torch.empty(shape)
        else:
            self.rows = torch.from_file(path, shared=True, size=shape[0] * shape[1] * shape[2],
                                        dtype=torch.float16).view(shape)
            try:
                os.remove(path)      # the mapping keeps the data; the file goes when the process ends
            except OSError:          # (systems that cannot remove an open file leave it for the user)
                pass
        self.nbytes = self.rows.numel() * self.rows.element_size()
        device = next(elmo.bilm.parameters()).device
        batch, done, reported = [], 0, 0
        for i, s in enumerate(unique):
            batch.append(s)
            if i + 1 < len(unique) and (len(batch) + 1) * (len(unique[i + 1]) + 2) <= batch_tokens:
                continue
            layers, _ = elmo.layers(batch_to_ids([list(t) for t in batch]).to(device))
            stacked = torch.stack(layers, dim=2).to("cpu", self.rows.dtype)       # (B, T+2, L+1, 2P)
            for b, t in enumerate(batch):
                self.rows[self.offsets[t]: self.offsets[t] + len(t) + 2] = stacked[b, : len(t) + 2]
            done, batch = done + len(batch), []
            if log and done * 10 // len(unique) > reported:
                reported = done * 10 // len(unique)
                log(f"  biLM layers cached for {done:,} / {len(unique):,} distinct sentences")

    def __contains__(self, sentence):
        return tuple(sentence) in self.offsets

    def __len__(self):
        return len(self.offsets)

    def get(self, sentences):
        """Token lists (all cached) -> (L+1, B, T+2, 2P) fp32 layers, zero beyond each sentence."""
        T = max(len(s) for s in sentences) + 2
        out = torch.zeros(len(sentences), T, *self.rows.shape[1:])               # (B, T+2, L+1, 2P)
        for b, s in enumerate(sentences):
            offset = self.offsets[tuple(s)]
            out[b, : len(s) + 2] = self.rows[offset: offset + len(s) + 2]
        return out.permute(2, 0, 1, 3)


class TokenFeatures(nn.Module):
    """What a task model reads for each token (paper section 3.3): [ELMo_k; x_k], the ELMo mix of a frozen
    biLM (`--elmo PATH` or `random`) next to a trainable, context-independent word embedding x_k. Either
    part can be absent: `--elmo none` is the no-pretraining baseline (x_k only), `--word-dim 0` ELMo only.

    `forward(sentences)` takes token lists and gives (B, T, output_dim) features and the (B, T) mask. The
    biLM layers come from `self.cache` (a LayerCache, set by the training scripts) when it holds every
    sentence of the batch, otherwise from the biLM itself."""

    def __init__(self, bilm: BiLM | None = None, word_vocab: list | None = None, word_dim: int = 300,
                 elmo_at: str = "input", layer_norm: bool = False, elmo_dropout: float = 0.5,
                 word_dropout: float = 0.2):
        super().__init__()
        if bilm is None and not (word_vocab and word_dim):
            raise ValueError("TokenFeatures needs a biLM, word embeddings, or both")
        if elmo_at not in ("input", "output", "both"):
            raise ValueError(f"elmo_at must be input, output or both, not {elmo_at!r}")
        # Paper section 3.3: ELMo at the task RNN's input, [ELMo_k; x_k], and/or at its output, [h_k; ELMo_k],
        # each place with its own scalar mix ("another set of output specific linear weights").
        self.elmo_at = elmo_at if bilm is not None else "input"
        n_mixes = 2 if self.elmo_at == "both" else 1
        self.elmo = ElmoEmbedder(bilm, n_mixes, layer_norm, elmo_dropout) if bilm is not None else None
        self.embed = None
        if word_vocab and word_dim:
            self.word_index = {w: i for i, w in enumerate(word_vocab)}
            self.embed = nn.Embedding(len(word_vocab), word_dim, padding_idx=PAD_ID)
            self.word_dropout = nn.Dropout(word_dropout)
        elmo_dim = self.elmo.output_dim if self.elmo else 0
        self.output_dim = (elmo_dim if self.elmo_at != "output" else 0) + (word_dim if self.embed else 0)
        self.elmo_output_dim = elmo_dim if self.elmo_at != "input" else 0   # what joins the RNN's output
        if not self.output_dim:
            raise ValueError("ELMo only at the output leaves the task RNN no input: add word embeddings")
        self.cache: LayerCache | None = None

    @classmethod
    def from_spec(cls, spec: dict, bilm_state: dict | None = None) -> "TokenFeatures":
        """Rebuild from a classifier checkpoint's plain-value spec (and the frozen biLM's weights, stored
        there once): what train_sst.py and train_mnli.py share when they build or load a model."""
        bilm = None
        if spec["bilm_config"] is not None:
            bilm = BiLM(ELMoConfig.from_dict(spec["bilm_config"]))
            if bilm_state is not None:
                bilm.load_state_dict(bilm_state)
        return cls(bilm, spec["word_vocab"], spec["word_dim"], spec.get("elmo_at", "input"),
                   layer_norm=spec["layer_norm"], elmo_dropout=spec["elmo_dropout"],
                   word_dropout=spec.get("word_dropout", spec["dropout"]))      # older checkpoints: one dropout

    def _layers(self, sentences, device):
        """Frozen biLM layers for a batch: (L+1, B, T+2, 2P) and the mask (B, T+2)."""
        if self.cache is not None and all(s in self.cache for s in sentences):
            layers = self.cache.get(sentences).to(device)
            lengths = torch.tensor([len(s) + 2 for s in sentences], device=device)
            return layers, length_mask(lengths, layers.shape[2])
        layers, mask = self.elmo.layers(batch_to_ids(sentences).to(device))
        return torch.stack(layers), mask

    def forward(self, sentences):
        """Token lists -> the task RNN's input (B, T, F), the mask (B, T), and the ELMo mix that joins the
        RNN's output (B, T, 2P), or None when ELMo is at the input only."""
        device = next(self.parameters()).device
        T = max(len(s) for s in sentences)
        mask = length_mask(torch.tensor([len(s) for s in sentences], device=device), T)     # (B, T)
        parts, at_output = [], None
        if self.elmo is not None:
            layers, mask_bos_eos = self._layers(sentences, device)              # (L+1, B, T+2, 2P)
            mixes = self.elmo.mix(list(layers), mask_bos_eos)                   # 1 or 2 x (B, T, 2P)
            if self.elmo_at != "output":
                parts.append(mixes[0])
            if self.elmo_at != "input":
                at_output = mixes[-1]
        if self.embed is not None:
            unk = self.word_index.get("<unk>", PAD_ID)
            ids = torch.tensor([[self.word_index.get(w, unk) for w in s] + [PAD_ID] * (T - len(s))
                                for s in sentences], device=device)             # (B, T)
            parts.append(self.word_dropout(self.embed(ids)))                    # (B, T, word_dim)
        return torch.cat(parts, dim=-1), mask, at_output                        # (B, T, F), (B, T), ...

    def l2_penalty(self):
        return self.elmo.l2_penalty() if self.elmo is not None else torch.zeros(())


def cache_layers(features: TokenFeatures, sentences, choice: str, out: str, log) -> float:
    """The scripts' `--cache auto|memory|disk|off`: build features.cache over `sentences` (train + dev).
    auto = memory (fp32) when it takes under a quarter of RAM, else an fp16 file `<out>.layers` when the
    disk has room, else off. Returns the seconds spent."""
    if features.elmo is None or choice == "off":
        return 0.0
    unique = {tuple(s) for s in sentences}
    fp32_bytes = sum(len(s) + 2 for s in unique) * len(features.elmo.mixes[0].weights) * features.elmo.output_dim * 4
    if choice == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free_disk = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
        choice = "memory" if fp32_bytes < ram / 4 else "disk" if fp32_bytes / 2 < free_disk / 2 else "off"
        if choice == "off":
            log(f"cache off: the biLM layers need {fp32_bytes / 2 ** 30:.1f} GiB; each epoch recomputes them")
            return 0.0
    t = time.time()
    log(f"caching the frozen biLM's layers ({choice}, {fp32_bytes / 2 ** 30 / (2 if choice == 'disk' else 1):.2f}"
        f" GiB); every epoch then runs only the mix and the task model")
    features.cache = LayerCache(features.elmo, unique, out + ".layers" if choice == "disk" else None, log=log)
    seconds = time.time() - t
    log(f"cache {choice} ({features.cache.nbytes / 2 ** 30:.2f} GiB) in {seconds:.0f}s")
    return seconds


def frozen_bilm(elmo: str, preset: str = "cpu", seed: int = 1, options: str | None = None):
    """The downstream scripts' `--elmo`: a biLM checkpoint or published *.hdf5 (options: see `find_options`)
    -> its frozen biLM without the LM softmax; 'random' -> the `preset` architecture, untrained, frozen (the
    ablation that separates pretraining from architecture); 'none' -> None. Returns (biLM or None, a
    description)."""
    if not elmo:
        raise UserError("--elmo is required: a train_lm.py checkpoint, 'random' or 'none'")
    if elmo == "none":
        return None, "none (trainable word embeddings only)"
    if elmo == "random":
        torch.manual_seed(seed)
        return BiLM(ELMoConfig(**PRESETS[preset], vocab_size=0)).eval(), f"random (untrained '{preset}' biLM)"
    bilm = load_elmo(elmo, options=options)
    bilm.head = None                                    # the LM softmax is not part of ELMo
    bilm.config.vocab_size = 0
    return bilm, f"{elmo} (frozen)"


def load_task_state(model: nn.Module, state: dict):
    """Load a task model's weights, all but the frozen biLM (a checkpoint stores that once, under "bilm")."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("features.elmo.bilm.") for k in missing):
        raise UserError(f"checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


class BiLstmEncoder(nn.Module):
    """Token features -> BiLSTM (packed, so padding never reaches the backward direction) -> (B, T, 2H).
    `encoder="mean"` skips the LSTM (the notebook's mean-pooling design)."""

    def __init__(self, input_dim: int, hidden: int, encoder: str = "bilstm"):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden, batch_first=True, bidirectional=True) if encoder == "bilstm" \
            else None
        self.output_dim = 2 * hidden if self.lstm is not None else input_dim

    def forward(self, x, mask):                         # (B, T, F), (B, T) -> (B, T, 2H)
        if self.lstm is None:
            return x * mask.unsqueeze(-1).to(x.dtype)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def pool(h, mask, how: str):
    """(B, T, H), (B, T) -> (B, H) or (B, 2H): max and/or mean over the real tokens only."""
    m = mask.unsqueeze(-1)
    pooled = []
    if "max" in how:
        pooled.append(h.masked_fill(~m, float("-inf")).max(dim=1).values)
    if "mean" in how:
        pooled.append((h * m.to(h.dtype)).sum(1) / m.sum(1).clamp(min=1).to(h.dtype))
    return torch.cat(pooled, dim=-1)


def task_optimizer(params, name: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The downstream scripts' optimizer: Adam, or SGD with momentum 0.9. Adam runs fused (one pass over
    each parameter instead of a dozen elementwise ops) on CPU and CUDA: on this project's CPU PyTorch's
    default loop took 7x as long over BCN's 26M parameters (489 against 67 ms, 1 thread), and the fused
    step makes a whole SST-2 BiLSTM training step 1.5x faster (README). The same update, up to the last
    bits."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)
