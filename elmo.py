"""ELMo in plain PyTorch: the bidirectional language model (biLM) and the frozen embedder built on it.

Peters et al., 2018, "Deep contextualized word representations" (arXiv:1802.05365). Read this file top to
bottom; it follows the order in which a sentence flows through the model:

    config -> character CNN -> highway -> LSTM cell -> LSTM stacks -> biLM with LM head
           -> scalar mix -> ELMo embedder -> save / load -> the published weights, both ways
           -> the tools (embed, neighbours) and their command line

What goes in, what comes out:

    ids = data.batch_to_ids([["The", "cat", "sat"], ["Hi"]])   # (B, T, W) character ids, 0 = padding
    bilm = load_elmo("lm.pt")                                   # frozen, eval mode, stateless
    out = bilm(ids)
    out["activations"]   # L+1 tensors (B, T, 2P): layer 0 = [e; e], layer k = [forward_k; backward_k]
    out["mask"]          # (B, T) bool, True at real tokens; activations are zero elsewhere

AllenNLP's published weights load the same way: `load_elmo("elmo_2x1024_128_2048cnn_1xhighway_weights.hdf5")`
finds `elmo_2x1024_128_2048cnn_1xhighway_options.json` beside it (else `options.json`, else `options=PATH`).

The tools around the model, `python elmo.py SUBCOMMAND --help` for each:

    python elmo.py convert --options X_options.json --weights X_weights.hdf5 --out x.pt   # published -> ours
    python elmo.py export --elmo lm.pt --out-dir lm_tf          # ours -> options.json + weights.hdf5
    python elmo.py embed --elmo lm.pt --input sentences.txt --output vectors.hdf5   # as `allennlp elmo`
    python elmo.py neighbors --elmo lm.pt --sentences text.txt --word play          # the paper's Table 4

Shape legend, used in every shape comment below:
    B batch, T tokens per sentence (with <S> and </S> where noted), W characters per token (50),
    C character-embedding dim, F total CNN filters, D LSTM cell, P LSTM projection (output),
    L LSTM layers, V softmax vocabulary, N number of (distinct) tokens fed to the character CNN.

Deviations from the paper / bilm-tf and from AllenNLP, and why:
  1. Stateless LSTMs. bilm-tf and AllenNLP carry the LSTM state from one batch into the next (AllenNLP's
     `_ElmoBiLm` does it silently, so the same sentence gives different vectors on a second call). Every call
     here starts from zero state, so a sentence's vectors depend only on the sentence. The golden test checks
     that we match AllenNLP's *first* call and not its second.
  2. Two training contexts (train_lm.py --context). `stream` is bilm-tf's: 20-token windows cut from the
     running text (sentences joined with their <S> and </S>), the state carried from window to window; only
     the training loop holds that state and passes it in explicitly (`stream_nll`). One difference: bilm-tf
     reverses each sentence for the backward LM but keeps the sentences in text order, so its backward
     state holds the *previous* sentence; here the backward LM reads the whole text reversed, so its state
     holds what follows, its true history. `sentence` trains on whole sentences from zero state, exactly
     how ELMo is used downstream. Either way `BiLM.forward`, the ELMo features, starts from zero state.
  3. Softmax. bilm-tf trains with a sampled softmax (8192 samples) over 793k words. We offer a full softmax
     (default) and torch's adaptive softmax (Grave et al., 2017), which is cheap *and* properly normalised,
     so training loss and reported perplexity are exact. We do not implement the sampled softmax.
  4. Two LSTM implementations over the same parameters: an explicit reference cell (with the cell and
     projection clipping of the original) and the fused `torch.nn.LSTM(proj_size=P)` path, which cannot clip.
     Tests hold the two equal. `impl="auto"` runs the reference cell where it must (clipping) and where it
     is faster (a CPU without gradients: it steps on columns, see `LstmLayer.reference`), nn.LSTM otherwise.
  5. TensorFlow adds 1.0 to the forget-gate bias at run time. AllenNLP folds it into the stored bias; we
     keep it in torch's second bias (`bias_hh`, which TensorFlow does not have), so the file's bias is
     stored bit for bit and `export` writes it back unchanged. Our own models start with forget bias 1.0.
  6. The character CNN runs once per *distinct* token of a batch and only over the character positions
     that can matter (see `CharCNN.forward`); both are exact, and tested against the per-token path. A
     frozen biLM can also remember token embeddings across batches (`CharCNN.remember_tokens`), as
     AllenNLP's `vocab_to_cache` did, without naming the vocabulary in advance.
  7. Scalar-mix layer norm is AllenNLP's: mean and variance over all unmasked elements of the whole batch
     (not per token). It is faithful to AllenNLP's numbers, and so batch-dependent; it is off by default.
  8. Presets use no clipping (fused LSTM, fast); pass clip values of 3.0 to train as the paper did.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# nn.LSTM with proj_size runs torch's own fused kernel instead of oneDNN's; that is expected, not a problem
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

from data import MAX_CHARS, PAD_CHAR, PAD_ID, UserError, batch_to_ids, boundary_char_ids

CHECKPOINT_FORMAT = "elmo-pytorch/1"  # bump when the checkpoint layout changes incompatibly
BOS_WORD_ID, EOS_WORD_ID = 1, 2       # word ids of <S>, </S>: data.SPECIALS = [<pad>, <S>, </S>, <unk>]


# ---------------------------------------------------------------------------------------------------------
# Configuration: the architecture only. Run settings (learning rate, device, ...) live in the scripts.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ELMoConfig:
    token_encoder: str = "char"       # "char" (character CNN, as ELMo) or "word" (word embeddings)
    # character CNN (Kim et al., 2016, as used by ELMo)
    n_characters: int = 262           # 256 bytes + 5 marks (word start/end, sentence start/end, pad) + 1 shift
    char_embed_dim: int = 16          # C
    filters: list = field(default_factory=lambda: [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256],
                                                   [6, 512], [7, 1024]])  # [width, count] pairs; F = sum
    n_highway: int = 1
    # word embeddings (token_encoder == "word"); the rows are the LM vocabulary
    word_embed_dim: int = 300
    # LSTM stacks, one per direction
    lstm_dim: int = 1024              # D, the memory cell
    projection_dim: int = 128         # P, the output of every layer and of the token encoder
    n_layers: int = 2                 # L
    cell_clip: float = 0.0            # paper: 3.0; 0 = off
    proj_clip: float = 0.0            # paper: 3.0; 0 = off
    residual: bool = True             # skip connection from the second layer on (paper: yes)
    dropout: float = 0.1              # on the input of every LSTM layer and before the softmax (paper: 0.1)
    # LM head: one softmax shared by both directions
    vocab_size: int = 0               # V, set from the training vocabulary
    softmax: str = "full"             # "full" or "adaptive"
    adaptive_cutoffs: list = field(default_factory=lambda: [2000, 10000])

    @property
    def n_filters(self) -> int:       # F
        return sum(n for _, n in self.filters)

    def validate(self) -> "ELMoConfig":
        if self.token_encoder not in ("char", "word"):
            raise ValueError(f"token_encoder must be 'char' or 'word', not {self.token_encoder!r}")
        if self.softmax not in ("full", "adaptive"):
            raise ValueError(f"softmax must be 'full' or 'adaptive', not {self.softmax!r}")
        if not 0 < self.projection_dim < self.lstm_dim:
            raise ValueError("need 0 < projection_dim < lstm_dim (nn.LSTM's proj_size rule)")
        if self.n_layers < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("need n_layers >= 1 and 0 <= dropout < 1")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ELMoConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}: checkpoint from a newer version?")
        return cls(**d).validate()


ELMO_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]  # 2048 filters
PRESETS = {
    # for tests: seconds on a CPU
    "tiny": dict(char_embed_dim=4, filters=[[1, 4], [2, 8], [3, 16]], n_highway=1, word_embed_dim=16,
                 lstm_dim=32, projection_dim=16),
    # for 2 CPU cores and a 15-minute budget, chosen by measurement (README, Presets):
    # a narrow CNN, a wide cell behind a small projection (cheap recurrence, cheap softmax), adaptive softmax
    "cpu": dict(char_embed_dim=16, filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 128]], n_highway=1,
                word_embed_dim=128, lstm_dim=512, projection_dim=128, softmax="adaptive",
                adaptive_cutoffs=[2000, 10000]),
    # AllenNLP's published models: "small" 2x1024_128_2048cnn_1xhighway (13.6M parameters without softmax),
    # "medium" 2x2048_256_2048cnn_1xhighway, "original" 2x4096_512_2048cnn_2xhighway (93.6M)
    "small": dict(filters=ELMO_FILTERS, n_highway=1, lstm_dim=1024, projection_dim=128),
    "medium": dict(filters=ELMO_FILTERS, n_highway=1, lstm_dim=2048, projection_dim=256),
    "original": dict(filters=ELMO_FILTERS, n_highway=2, lstm_dim=4096, projection_dim=512),
}


# ---------------------------------------------------------------------------------------------------------
# Character CNN token encoder: characters -> one P-dim vector per token, no context yet.
# ---------------------------------------------------------------------------------------------------------
class Highway(nn.Module):
    """y = g * relu(W_t x + b_t) + (1 - g) * x, with g = sigmoid(W_c x + b_c) (Srivastava et al., 2015).

    Named as in bilm-tf, where the gate is called the "carry" gate although it gates the *transform*.
    AllenNLP stores one fused Linear with the carry half negated; we keep the two halves as bilm-tf does,
    so converted weights need no sign flips.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.transform = nn.Linear(dim, dim)
        self.carry = nn.Linear(dim, dim)
        nn.init.constant_(self.carry.bias, -2.0)  # start close to the identity, as bilm-tf does

    def forward(self, x):                               # (N, F) -> (N, F)
        gate = torch.sigmoid(self.carry(x))
        return gate * F.relu(self.transform(x)) + (1.0 - gate) * x


class CharCNN(nn.Module):
    """Token encoder of ELMo: char embedding -> convolutions -> max-pool -> relu -> highway -> projection."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        c = config
        # id 0 is a padding *token* (no characters at all) and embeds to zeros, as in AllenNLP
        self.char_embed = nn.Embedding(c.n_characters, c.char_embed_dim, padding_idx=PAD_ID)
        self.convs = nn.ModuleList(nn.Conv1d(c.char_embed_dim, n, width) for width, n in c.filters)
        self.max_width = max(width for width, _ in c.filters)
        self.highways = nn.ModuleList(Highway(c.n_filters) for _ in range(c.n_highway))
        self.proj = nn.Linear(c.n_filters, c.projection_dim)
        self.unique = True       # run once per distinct token (exact); bench.py turns it off to measure it
        self.memo = None         # token -> row of memo_table, when remember_tokens() is on (frozen use)

    def remember_tokens(self, max_tokens: int = 500_000):
        """Keep every token's embedding across calls, for a frozen biLM (inference, no gradients): a token's
        embedding depends on its characters alone, so a word seen in an earlier batch need not go through
        the CNN, highway and projection again (AllenNLP's `vocab_to_cache`, without naming the vocabulary in
        advance). Up to `max_tokens` distinct tokens (P floats each) are kept; later ones are computed
        every time. The same numbers as computing them, to float rounding (rows of another batch)."""
        self.memo, self.memo_max = {}, max_tokens
        self.memo_table = None                           # (capacity, P), grown by doubling

    def encode_tokens(self, chars):                     # (N, W) -> (N, P)
        x = self.char_embed(chars).transpose(1, 2)      # (N, W) -> (N, W, C) -> (N, C, W) for Conv1d
        # Max-pool over positions *before* the activation, as in bilm-tf (relu is monotonic, so this is the
        # same as relu-then-pool, and cheaper: the activation runs on (N, F) instead of (N, F, W)).
        pooled = [conv(x).max(dim=2).values for conv in self.convs]   # each (N, F_k)
        h = F.relu(torch.cat(pooled, dim=1))            # (N, F)
        for highway in self.highways:
            h = highway(h)
        return self.proj(h)                             # (N, F) -> (N, P)

    def forward(self, chars, unique: bool | None = None):   # (B, T, W) -> (B, T, P)
        B, T, W = chars.shape
        flat = chars.reshape(B * T, W)                  # (B, T, W) -> (B*T, W)
        if not (self.unique if unique is None else unique):
            return self.encode_tokens(flat).reshape(B, T, -1)
        # 1) Trim character positions that cannot change the result. A window of width k touches a real
        #    character only if it starts before the longest word ends (at `longest`); every window after
        #    that sees only the pad character and gives the same value. Keeping `longest + max_width`
        #    positions keeps every distinct window value, so the max-pool is unchanged. (Exact.)
        is_char = (flat != PAD_ID) & (flat != PAD_CHAR + 1)                # real characters and marks
        longest = int(is_char.sum(dim=1).max()) if flat.numel() else 0
        flat = flat[:, : min(W, longest + self.max_width)]
        # 2) Run the CNN once per distinct token of the batch: a sentence batch repeats "the", "," ...
        #    many times, and the CNN is the same function for each copy. (Exact.)
        distinct, inverse = torch.unique(flat, dim=0, return_inverse=True)   # (N, W'), (B*T,)
        if self.memo is not None and not torch.is_grad_enabled():
            return self.remembered(distinct)[inverse].reshape(B, T, -1)
        return self.encode_tokens(distinct)[inverse].reshape(B, T, -1)       # (N, P) -> (B, T, P)

    def remembered(self, distinct):                     # (N, W') -> (N, P), from the memo where it can
        # the key: a token's characters up to its end-of-word mark (the trimmed width varies per batch)
        n_chars = ((distinct != PAD_ID) & (distinct != PAD_CHAR + 1)).sum(dim=1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(distinct.tolist(), n_chars)]
        rows = [self.memo.get(k, -1) for k in keys]
        new = [i for i, r in enumerate(rows) if r < 0]
        if new:
            computed = self.encode_tokens(distinct[new])                    # (new, P)
            room = min(len(new), self.memo_max - len(self.memo))
            if room > 0:
                start = len(self.memo)
                if self.memo_table is None or start + room > len(self.memo_table):
                    grown = computed.new_empty(max(2 * (start + room), 1024), computed.shape[1])
                    if self.memo_table is not None:
                        grown[:start] = self.memo_table[:start]
                    self.memo_table = grown
                self.memo_table[start: start + room] = computed[:room]
                for j in range(room):
                    self.memo[keys[new[j]]] = rows[new[j]] = start + j
        if all(r >= 0 for r in rows):
            return self.memo_table[torch.tensor(rows, dtype=torch.long, device=distinct.device)]
        out = computed.new_empty(len(rows), computed.shape[1])              # the memo is full:
        for j, i in enumerate(new):                                         # new tokens as computed,
            out[i] = computed[j]
        fresh = set(new)
        known = [i for i, r in enumerate(rows) if r >= 0 and i not in fresh]
        if known:                                                           # the others from the memo
            out[known] = self.memo_table[torch.tensor([rows[i] for i in known], device=distinct.device)]
        return out


class WordEncoder(nn.Module):
    """The word-embedding alternative (as in the notebook this project grew from): one vector per LM-vocab
    word, projected to P. Cannot represent words outside the vocabulary (they map to <unk>)."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_embed_dim, padding_idx=PAD_ID)
        self.proj = nn.Linear(config.word_embed_dim, config.projection_dim)

    def forward(self, words, unique: bool = True):      # (B, T) -> (B, T, P)
        return self.proj(self.embed(words))


# ---------------------------------------------------------------------------------------------------------
# LSTM with a projection (Sak et al., 2014), one layer, one direction; two implementations, one parameter set.
# ---------------------------------------------------------------------------------------------------------
class LstmLayer(nn.Module):
    """One LSTM layer with cell D and projected output P. The parameters are an `nn.LSTM(proj_size=P)`'s,
    so the fused kernel can run them; `reference()` runs the same parameters one explicit step at a time.
    Gate order (torch's): input i, forget f, cell candidate g, output o."""

    def __init__(self, input_dim: int, config: ELMoConfig):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, config.lstm_dim, proj_size=config.projection_dim, batch_first=True)
        self.cell_clip, self.proj_clip = config.cell_clip, config.proj_clip
        with torch.no_grad():  # forget-gate bias 1.0, the value TensorFlow's LSTMCell adds at run time
            D = config.lstm_dim
            self.lstm.bias_ih_l0[D:2 * D].fill_(1.0)
            self.lstm.bias_hh_l0[D:2 * D].zero_()

    # Both paths take an optional initial state (h (B, P), c (B, D)) and return the final one with the
    # outputs. None means zero state, which is what ELMo's features use: only the stream-mode training and
    # evaluation loop passes a state, explicitly, from one window of text to the next.
    def fused(self, x, state=None):                     # (B, T, in) -> (B, T, P), state
        if self.cell_clip or self.proj_clip:
            raise ValueError("the fused nn.LSTM path cannot clip; use impl='reference' or clip 0")
        hx = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))   # (1, B, P), (1, B, D)
        out, (h, c) = self.lstm(x, hx)
        return out, (h[0], c[0])

    def reference(self, x, state=None):                 # (B, T, in) -> (B, T, P), state
        lstm = self.lstm
        B, T, _ = x.shape
        # The cell runs on columns: the state is h^T (P, B), and each step computes W_hh @ h^T rather than
        # h @ W_hh^T. The arithmetic is the same; but a (4D, P) @ (P, B) product with a small B runs ~1.7x
        # faster on a CPU than the (B, P) @ (P, 4D) one, and it dominates the cell's time (README,
        # Performance). The weights are used as stored, no copies.
        # The input's share of every gate, for all steps in one matmul; only the recurrence is sequential.
        columns = x.permute(2, 1, 0).reshape(x.shape[2], T * B)                      # (in, T*B)
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).unsqueeze(1)                      # (4D, 1)
        gates_x = torch.addmm(bias, lstm.weight_ih_l0, columns).view(-1, T, B)     # (4D, T, B)
        if state is None:                               # zero state: every call starts fresh
            h, c = x.new_zeros(lstm.proj_size, B), x.new_zeros(lstm.hidden_size, B)  # (P, B), (D, B)
        else:
            h, c = state[0].T, state[1].T
        outputs = []
        for t in range(T):
            gates = gates_x[:, t]                                             # (4D, B)
            if t > 0 or state is not None:              # from zero state, W_hh @ h is exactly 0: skip it
                gates = torch.addmm(gates, lstm.weight_hh_l0, h)              # + (4D, P) @ (P, B)
            i, f, g, o = gates.chunk(4, dim=0)                                # 4 x (D, B)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)       # new memory cell
            if self.cell_clip:
                c = c.clamp(-self.cell_clip, self.cell_clip)
            h = lstm.weight_hr_l0 @ (torch.sigmoid(o) * torch.tanh(c))        # (P, D) @ (D, B) projection
            if self.proj_clip:
                h = h.clamp(-self.proj_clip, self.proj_clip)
            outputs.append(h)
        out = torch.stack(outputs).permute(2, 0, 1).contiguous()     # T x (P, B) -> (B, T, P)
        return out, (h.T, c.T)                                        # (B, P), (B, D)


def length_mask(lengths, T: int):
    """(B,) lengths -> (B, T) bool mask, True at the first lengths[b] positions of row b."""
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def reverse_within_length(x, lengths):
    """Reverse each row's first `lengths[b]` steps and leave its padding where it is: (B, T, ...) -> same.
    The backward LSTM reads the reversed sentence forwards, so it starts at the sentence's last real token,
    never at padding. Applying it twice gives back the input."""
    B, T = x.shape[:2]
    steps = torch.arange(T, device=x.device).unsqueeze(0)           # (1, T)
    index = lengths.unsqueeze(1) - 1 - steps                          # (B, T)
    index = torch.where(index >= 0, index, steps.expand(B, T))       # padding keeps its place
    index = index.view(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class LstmStack(nn.Module):
    """L LSTM layers of one direction, reading left to right. Returns every layer's output, because ELMo's
    representation mixes all of them. Dropout on each layer's input (as bilm-tf); residual from layer 2 on."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        P = config.projection_dim
        self.layers = nn.ModuleList(LstmLayer(P, config) for _ in range(config.n_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.residual = config.residual

    def forward(self, x, impl: str, state=None):       # (B, T, P) -> L x (B, T, P), L x state
        outputs, states = [], []
        for k, layer in enumerate(self.layers):
            inp = self.dropout(x)
            run = layer.reference if impl == "reference" else layer.fused
            h, layer_state = run(inp, None if state is None else state[k])
            if k > 0 and self.residual:
                h = h + x                               # skip connection (AllenNLP: use_skip_connections)
            outputs.append(h)
            states.append(layer_state)
            x = h
        return outputs, states


# ---------------------------------------------------------------------------------------------------------
# The biLM: token encoder -> forward stack and backward stack -> one shared softmax.
# ---------------------------------------------------------------------------------------------------------
class BiLM(nn.Module):
    """Bidirectional LM (paper eq. 1-3). Forward: p(t_k | t_1..t_{k-1}); backward: p(t_k | t_{k+1}..t_N);
    both share the token encoder and the softmax, and have separate LSTMs. The two stacks never exchange
    information, so the forward output at a position has seen only that position and the ones before it:
    that is what makes it a language model and not a model that reads the answer."""

    def __init__(self, config: ELMoConfig, impl: str = "auto"):
        super().__init__()
        self.config = config.validate()
        self.impl = impl
        self.token_encoder = CharCNN(config) if config.token_encoder == "char" else WordEncoder(config)
        self.forward_lstm = LstmStack(config)
        self.backward_lstm = LstmStack(config)
        self.dropout = nn.Dropout(config.dropout)
        if config.vocab_size <= 0:
            self.head = None                            # a biLM without LM head (official weights)
        elif config.softmax == "full":
            self.head = nn.Linear(config.projection_dim, config.vocab_size)
        else:
            cutoffs = [c for c in config.adaptive_cutoffs if c < config.vocab_size - 1]
            self.head = nn.AdaptiveLogSoftmaxWithLoss(config.projection_dim, config.vocab_size, cutoffs,
                                                      div_value=4.0)

    @property
    def lstm_impl(self) -> str:
        """'auto' picks the exact path that is faster: the reference cell when the weights clip (nn.LSTM
        cannot), and on a CPU without gradients (frozen ELMo features: 1.5x nn.LSTM's speed at `small`,
        README Performance); nn.LSTM otherwise (training; GPUs)."""
        if self.impl != "auto":
            return self.impl
        if self.config.cell_clip or self.config.proj_clip:
            return "reference"
        on_cpu = next(self.parameters()).device.type == "cpu"
        return "reference" if on_cpu and not torch.is_grad_enabled() else "fused"

    def add_boundaries(self, inputs):
        """Wrap each sentence in <S> ... </S>: (B, T, W) -> (B, T+2, W) char ids, or (B, T) -> (B, T+2) word
        ids. Returns the new inputs, the new mask (B, T+2) and the lengths with boundaries (B,)."""
        is_char = inputs.dim() == 3
        mask = (inputs > 0).any(dim=-1) if is_char else inputs > 0          # (B, T)
        lengths = mask.sum(dim=1)                                            # (B,)
        B = inputs.shape[0]
        out = inputs.new_zeros(B, inputs.shape[1] + 2, *inputs.shape[2:])    # (B, T+2[, W])
        out[:, 1:-1] = inputs
        rows = torch.arange(B, device=inputs.device)
        if is_char:
            bos, eos = boundary_char_ids(inputs.device)                      # (W,), (W,)
        else:
            bos, eos = BOS_WORD_ID, EOS_WORD_ID
        out[:, 0] = bos
        out[rows, lengths + 1] = eos
        mask = length_mask(lengths + 2, out.shape[1])
        return out, mask, lengths + 2

    def encode(self, inputs):
        """Inputs *with* boundaries -> token embeddings (B, T, P) and the two stacks' outputs (L x (B, T, P)
        each), zero at padding. Stateless: every call starts from zero LSTM state."""
        mask = (inputs > 0).any(dim=-1) if inputs.dim() == 3 else inputs > 0  # (B, T)
        lengths = mask.sum(dim=1)
        m = mask.unsqueeze(-1).to(torch.get_default_dtype())                   # (B, T, 1)
        tokens = self.token_encoder(inputs)                                     # (B, T, P)
        m = m.to(tokens.dtype)
        forward = [h * m for h in self.forward_lstm(tokens, self.lstm_impl)[0]]
        # backward: read each sentence reversed within its length, then put the outputs back in place
        backward = self.backward_lstm(reverse_within_length(tokens, lengths), self.lstm_impl)[0]
        backward = [reverse_within_length(h, lengths) * m for h in backward]
        return tokens, forward, backward

    def forward(self, inputs, boundaries: bool = False):
        """ELMo's layers for sentences without boundaries (the public contract, see the module docstring):
        {"activations": L+1 x (B, T, 2P), "mask": (B, T)}. With boundaries=True the <S>/</S> positions are
        kept: L+1 x (B, T+2, 2P) and the mask (B, T+2), as AllenNLP's `_ElmoBiLm` returns them."""
        inputs_bos_eos, mask_bos_eos, _ = self.add_boundaries(inputs)
        tokens, forward, backward = self.encode(inputs_bos_eos)
        m = mask_bos_eos.unsqueeze(-1).to(tokens.dtype)
        layers = [torch.cat([tokens, tokens], dim=-1) * m]                   # layer 0: [e; e] (B, T+2, 2P)
        layers += [torch.cat([f, b], dim=-1) for f, b in zip(forward, backward)]
        if boundaries:
            return {"activations": layers, "mask": mask_bos_eos}
        return {"activations": [remove_boundaries(h, mask_bos_eos) for h in layers],
                "mask": mask_bos_eos[:, 2:]}

    def lm_nll(self, inputs, targets):
        """Summed negative log-likelihood of both directions (paper eq. 3) and the prediction count.

        inputs: (B, T) sentences without boundaries (char ids (B, T, W) or word ids); targets: (B, T+2) LM
        vocabulary ids of <S> w_1 .. w_n </S>, PAD_ID after. The forward output at position t predicts
        token t+1 and the backward output at t predicts token t-1, so each sentence gives n+1 predictions
        per direction (the words and </S>, resp. the words and <S>): the word-level PTB convention.
        Returns (nll_forward_sum, nll_backward_sum, n_predictions per direction)."""
        inputs_bos_eos, _, lengths = self.add_boundaries(inputs)                  # lengths: n + 2
        _, forward, backward = self.encode(inputs_bos_eos)
        fwd_h, bwd_h = self.dropout(forward[-1]), self.dropout(backward[-1])     # (B, T+2, P)
        fwd_y, bwd_y = targets[:, 1:], targets[:, :-1]                            # (B, T+1)
        # Prediction j = 0 .. n of a sentence: forward output j -> token j+1, backward output j+1 ->
        # token j. Which j exist comes from the *inputs*' lengths: a mask from the targets alone
        # (`bwd_y != PAD`) would also ask the backward output at the padding after </S> to predict </S>.
        # A PAD target skips one prediction (the leakage tests use that).
        real = length_mask(lengths - 1, fwd_y.shape[1])                          # (B, T+1)
        fwd_keep, bwd_keep = real & (fwd_y != PAD_ID), real & (bwd_y != PAD_ID)
        nll_f = self.token_nll(fwd_h[:, :-1][fwd_keep], fwd_y[fwd_keep])         # (n, P) -> ()
        nll_b = self.token_nll(bwd_h[:, 1:][bwd_keep], bwd_y[bwd_keep])
        return nll_f, nll_b, int(fwd_keep.sum())

    def stream_encode(self, forward_inputs, backward_inputs, state=None):
        """Both stacks over one window of a token stream (--context stream), from `state` (None = zero, the
        start of an epoch), each reading its own window left to right: `data.Corpus.window` gives the
        backward stack its window already read from the stream's end, so nothing is reversed here.
        (B, n[, W]) twice -> the forward and backward top layers (B, n, P) each, and the state to carry
        into the next window: (forward stack's, backward stack's), each L x ((B, P), (B, D))."""
        B = forward_inputs.shape[0]
        tokens = self.token_encoder(torch.cat([forward_inputs, backward_inputs]))  # (2B, n, P): one CNN call
        f, f_state = self.forward_lstm(tokens[:B], self.lstm_impl, None if state is None else state[0])
        b, b_state = self.backward_lstm(tokens[B:], self.lstm_impl, None if state is None else state[1])
        return f[-1], b[-1], (f_state, b_state)

    def stream_nll(self, forward_window, backward_window, state=None):
        """Summed NLL of both directions over one stream window (paper eq. 3, as bilm-tf trained it).
        Each window is (inputs, targets) from `data.Corpus.window`: target j is the token after input j in
        that direction's reading order, PAD_ID where nothing is scored. There is no padding inside the
        text, so no mask beyond the targets'. Returns (nll_forward, nll_backward, n_forward, n_backward,
        state); the caller detaches the state before the next window (truncated backpropagation through
        time), so gradients stop at the window's start while the state carries on."""
        (x_f, y_f), (x_b, y_b) = forward_window, backward_window
        f, b, state = self.stream_encode(x_f, x_b, state)
        keep_f, keep_b = y_f != PAD_ID, y_b != PAD_ID                              # (B, n) each
        nll_f = self.token_nll(self.dropout(f[keep_f]), y_f[keep_f])              # (n_f, P) -> ()
        nll_b = self.token_nll(self.dropout(b[keep_b]), y_b[keep_b])
        return nll_f, nll_b, int(keep_f.sum()), int(keep_b.sum()), state

    def token_nll(self, h, y):                          # (n, P), (n,) -> () summed NLL
        if isinstance(self.head, nn.Linear):
            return F.cross_entropy(self.head(h).float(), y, reduction="sum")   # (n, P) -> (n, V)
        return -self.head(h.float(), y).output.sum()    # adaptive softmax: exact log p(y), normalised


def remove_boundaries(x, mask_bos_eos):
    """Drop the <S> and </S> positions: (B, T+2, ...) -> (B, T, ...), zero at padding (as AllenNLP's
    `remove_sentence_boundaries`)."""
    lengths = mask_bos_eos.sum(dim=1) - 2                                # (B,)
    out = x[:, 1:-1].clone()                                             # (B, T, ...)
    keep = length_mask(lengths, out.shape[1])                            # (B, T)
    return out * keep.view(*keep.shape, *([1] * (x.dim() - 2))).to(out.dtype)


# ---------------------------------------------------------------------------------------------------------
# Scalar mix (paper eq. 1): ELMo_k = gamma * sum_j s_j h_{k,j}, s = softmax(w).
# ---------------------------------------------------------------------------------------------------------
class ScalarMix(nn.Module):
    """A task-specific, learned weighted sum of the biLM's L+1 layers. `layer_norm=True` normalises each
    layer first (paper section 3.2 footnote), AllenNLP-style: one mean and variance over all *unmasked*
    elements of the batch, so padding never moves the statistics."""

    def __init__(self, n_layers: int, layer_norm: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))  # w, softmax-normalised into s
        self.gamma = nn.Parameter(torch.ones(()))            # gamma, scales the whole vector
        self.layer_norm = layer_norm

    def forward(self, layers, mask=None):              # L+1 x (B, T, 2P), (B, T) -> (B, T, 2P)
        s = torch.softmax(self.weights, dim=0)
        if self.layer_norm:
            if mask is None:
                raise ValueError("layer_norm needs the mask")
            m = mask.unsqueeze(-1).to(layers[0].dtype)                  # (B, T, 1)
            count = m.sum() * layers[0].shape[-1]
            normed = []
            for h in layers:
                mean = (h * m).sum() / count
                var = (((h - mean) * m) ** 2).sum() / count
                normed.append((h - mean) / torch.sqrt(var + 1e-13))     # AllenNLP's tiny_value_of_dtype
            layers = normed
        return self.gamma * sum(w * h for w, h in zip(s, layers))


# ---------------------------------------------------------------------------------------------------------
# The ELMo embedder: a frozen biLM and task-specific scalar mixes (paper section 3.3).
# ---------------------------------------------------------------------------------------------------------
class ElmoEmbedder(nn.Module):
    """Frozen biLM + `n_outputs` scalar mixes + dropout. Only the mixes train. As AllenNLP's `Elmo`, the
    mix runs over the layers *with* <S>/</S> (so layer-norm statistics match it), then drops them.

    `layers()` is the expensive, frozen part; its output can be cached per example and fed to `mix()`."""

    def __init__(self, bilm: BiLM, n_outputs: int = 1, layer_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        self.bilm = bilm.eval()
        for p in self.bilm.parameters():
            p.requires_grad_(False)
        n_layers = bilm.config.n_layers + 1
        self.mixes = nn.ModuleList(ScalarMix(n_layers, layer_norm) for _ in range(n_outputs))
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * bilm.config.projection_dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.bilm.eval()                                # the biLM never leaves eval mode (no dropout)
        return self

    @torch.no_grad()
    def layers(self, inputs):
        """(B, T, W) char ids -> L+1 layers (B, T+2, 2P) with boundaries, and the mask (B, T+2)."""
        out = self.bilm(inputs, boundaries=True)
        return out["activations"], out["mask"]

    def mix(self, layers, mask_bos_eos):
        """L+1 x (B, T+2, 2P) -> n_outputs x (B, T, 2P): mix, drop the boundaries, dropout."""
        return [self.dropout(remove_boundaries(mix(layers, mask_bos_eos), mask_bos_eos))
                for mix in self.mixes]

    def forward(self, inputs):
        layers, mask_bos_eos = self.layers(inputs)
        return {"elmo": self.mix(layers, mask_bos_eos), "mask": mask_bos_eos[:, 2:]}

    def l2_penalty(self):
        """sum ||w||^2 of the mix weights: the paper's lambda term, pulls the mix towards an average."""
        return sum((mix.weights ** 2).sum() for mix in self.mixes)


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: self-describing, tensors and plain containers only, loaded with weights_only=True.
# ---------------------------------------------------------------------------------------------------------
def atomic_save(obj, path: str):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash or a kill
    at any instant leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str, kind: str | tuple | None = None) -> dict:
    """Load a checkpoint written by one of our scripts, safely, with one-line errors for every failure:
    missing, not a PyTorch file, truncated, holds pickled code, wrong format version, wrong kind."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"checkpoint path is a directory, expected a .pt file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise UserError(f"refusing to load {path}: it contains pickled Python objects, which could run "
                            f"code; only tensors and plain containers are accepted") from None
        raise UserError(f"{path} is not a valid checkpoint (corrupt or truncated: {first[:80]})") from None
    except Exception as e:  # noqa: BLE001  (a non-checkpoint file can fail in the zip reader or unpickler)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another kind "
                        f"of file: {first[:80]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{path} is a PyTorch file but not one of our checkpoints (no 'format' key)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']!r}; this code reads "
                        f"{CHECKPOINT_FORMAT!r}")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and ckpt.get("kind") not in kinds:
        raise UserError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {' or '.join(kinds)}"
                        + (" (a biLM from train_lm.py)" if "bilm" in kinds else ""))
    return ckpt


def bilm_from_checkpoint(ckpt: dict, impl: str = "auto") -> BiLM:
    """Rebuild a biLM from a checkpoint's config and weights: no sizes asked for again."""
    model = BiLM(ELMoConfig.from_dict(ckpt["config"]), impl=impl)
    model.load_state_dict(ckpt["model"])
    model.vocab = ckpt.get("vocab")
    return model


def load_elmo(path: str, device="cpu", impl: str = "auto", options: str | None = None) -> BiLM:
    """The public entry point: a biLM checkpoint (`train_lm.py`, `python elmo.py convert`) or a published
    `*.hdf5` weight file (its options found by `find_options`, or named by `options=`) -> frozen biLM in
    eval mode."""
    if str(path).endswith((".hdf5", ".h5")):
        model = load_official_weights(find_options(path, options), path, impl)
    else:
        model = bilm_from_checkpoint(load_checkpoint(path, "bilm"), impl)
    if impl == "fused" and (model.config.cell_clip or model.config.proj_clip):
        raise UserError(f"{path} clips its LSTM cells/outputs (the published weights do), which the fused "
                        f"nn.LSTM cannot: its outputs would drift (README, Using the published ELMo weights); "
                        f"use the reference cell (impl 'auto' or 'reference')")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# The published weights (bilm-tf's HDF5 + options JSON, as AllenNLP distributes them) <-> our BiLM, both ways,
# with every TensorFlow quirk at its place. Reading is `load_official_weights`; writing is `official_weights`.
# ---------------------------------------------------------------------------------------------------------
def find_options(weights: str, options: str | None = None) -> str:
    """The options file of a published weight file: `options` when given; else the published naming, where
    `elmo_2x1024_128_2048cnn_1xhighway_weights.hdf5` comes with `..._options.json` beside it; else
    `options.json` in the same folder."""
    from data import check_file
    if options:
        return check_file(options, "options file")
    folder, name = os.path.split(weights)
    stem = os.path.splitext(name)[0]
    candidates = [os.path.join(folder, stem[: -len("weights")] + "options.json")] if stem.endswith("weights") \
        else []
    candidates.append(os.path.join(folder, "options.json"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"no options file for {weights}: looked for {' and '.join(candidates)}; name it with "
                    f"--elmo-options PATH (in Python: load_elmo(path, options=PATH))")


def read_options(path: str) -> ELMoConfig:
    """A published options JSON -> our config. The keys read are the ones bilm-tf and AllenNLP read."""
    try:
        with open(path, encoding="utf-8") as f:
            options = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"options file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"options file {path} is not a text file (not UTF-8)") from None

    def need(section, key):
        value = options.get(section, {}).get(key) if isinstance(options.get(section), dict) else None
        if value is None:
            raise UserError(f"options file {path} has no '{section}.{key}' (a published options file has it)")
        return value

    if not isinstance(options, dict) or "char_cnn" not in options:
        raise UserError(f"options file {path} has no 'char_cnn' section: only character-input biLMs are "
                        f"supported (bilm-tf's token-input models keep their embeddings in another file)")
    cnn, lstm = options["char_cnn"], options.get("lstm", {})
    if cnn.get("activation", "relu") != "relu" or cnn.get("max_characters_per_token", MAX_CHARS) != MAX_CHARS:
        raise UserError(f"options file {path}: only relu character CNNs with {MAX_CHARS} characters per "
                        f"token are supported (found {cnn.get('activation')!r}, "
                        f"{cnn.get('max_characters_per_token')})")
    try:
        return ELMoConfig(
            token_encoder="char", n_characters=262, char_embed_dim=int(need("char_cnn", "embedding")["dim"]),
            filters=[[int(w), int(n)] for w, n in need("char_cnn", "filters")],
            n_highway=int(cnn.get("n_highway") or 0),
            lstm_dim=int(need("lstm", "dim")), projection_dim=int(need("lstm", "projection_dim")),
            n_layers=int(lstm.get("n_layers", 1)),           # bilm-tf's default
            # bilm-tf passes the values to TensorFlow's LSTMCell, where None (or absent) means no clipping
            cell_clip=float(lstm.get("cell_clip") or 0), proj_clip=float(lstm.get("proj_clip") or 0),
            residual=bool(need("lstm", "use_skip_connections")), dropout=0.0, vocab_size=0).validate()
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"options file {path} does not describe a biLM we can build: {e}") from None


def official_layout(config: ELMoConfig):
    """Every dataset of a published weight file: (name, shape in the file). The shapes are TensorFlow's:
    a dense layer's kernel is (in, out) because TF computes x @ W; an LSTM layer's kernel W_0 stacks the
    input's rows over the recurrent output's, (in + P, 4D), because TF's LSTMCell multiplies [x; h] by it."""
    C, Fn, D, P = config.char_embed_dim, config.n_filters, config.lstm_dim, config.projection_dim
    layout = [("char_embed", (config.n_characters - 1, C))]                # no row for the padding id 0
    for k, (width, n) in enumerate(config.filters):
        layout += [(f"CNN/W_cnn_{k}", (1, width, C, n)), (f"CNN/b_cnn_{k}", (n,))]   # a conv2d of height 1
    for k in range(config.n_highway):
        layout += [(f"CNN_high_{k}/{w}_{part}", (Fn, Fn) if w == "W" else (Fn,))
                   for part in ("carry", "transform") for w in ("W", "b")]
    layout += [("CNN_proj/W_proj", (Fn, P)), ("CNN_proj/b_proj", (P,))]
    for direction in (0, 1):                                                # 0 forward, 1 backward
        for k in range(config.n_layers):
            cell = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"
            layout += [(f"{cell}/W_0", (P + P, 4 * D)), (f"{cell}/B", (4 * D,)), (f"{cell}/W_P_0", (D, P))]
    return layout


def tf_gate_order(D: int):
    """TF's LSTMCell orders the gates i, j (candidate), f, o; torch orders them i, f, g (candidate), o. This
    index moves rows from one order to the other; it swaps the two middle blocks, so it is its own inverse."""
    return torch.cat([torch.arange(0, D), torch.arange(2 * D, 3 * D), torch.arange(D, 2 * D),
                      torch.arange(3 * D, 4 * D)])


def load_official_weights(options_file: str, weights_file: str, impl: str = "auto") -> BiLM:
    """A published options JSON + HDF5 weight file -> our BiLM (no LM softmax: the files have none).
    Every dataset is checked against the shape the options imply before anything is built, so a file that
    is truncated, lacks a dataset or belongs to other options is one error line naming it."""
    try:
        import h5py  # only needed here: official weights are HDF5
    except ImportError:
        raise UserError("reading official weights needs h5py: pip install h5py") from None
    from data import check_file
    config = read_options(options_file)
    arrays = {}
    try:
        with h5py.File(check_file(weights_file, "weights file"), "r") as h5:
            for name, shape in official_layout(config):
                if name not in h5:
                    raise UserError(f"weights file {weights_file} has no dataset '{name}' (wrong file, or "
                                    f"options {options_file} describe another model)")
                if tuple(h5[name].shape) != shape:
                    raise UserError(f"weights file {weights_file}: '{name}' has shape {tuple(h5[name].shape)}, "
                                    f"but options {options_file} need {shape}: the two files do not belong "
                                    f"together")
                arrays[name] = torch.from_numpy(h5[name][...]).float()
    except OSError as e:   # not HDF5 at all, or cut short: h5py raises OSError on open or on read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"weights file {weights_file} is not a readable HDF5 file (truncated or another kind "
                        f"of file: {first[:80]})") from None
    model = BiLM(config, impl=impl)
    model.load_state_dict(state_from_official(arrays, config))
    model.vocab = None
    return model.eval()


def state_from_official(arrays: dict, config: ELMoConfig) -> dict:
    """Datasets of a published weight file (name -> tensor, TF layout) -> our state_dict."""
    state = {}
    # char embedding: the file has no row for id 0 (padding); AllenNLP and bilm-tf prepend a zero row
    char_embed = arrays["char_embed"]
    state["token_encoder.char_embed.weight"] = torch.cat([torch.zeros(1, char_embed.shape[1]), char_embed])
    for k in range(len(config.filters)):
        # TF conv2d kernel (1, width, C, F_k) -> torch Conv1d (F_k, C, width)
        state[f"token_encoder.convs.{k}.weight"] = arrays[f"CNN/W_cnn_{k}"][0].permute(2, 1, 0)
        state[f"token_encoder.convs.{k}.bias"] = arrays[f"CNN/b_cnn_{k}"]
    for k in range(config.n_highway):
        for part in ("transform", "carry"):  # TF computes x @ W, torch x @ W.T
            state[f"token_encoder.highways.{k}.{part}.weight"] = arrays[f"CNN_high_{k}/W_{part}"].T
            state[f"token_encoder.highways.{k}.{part}.bias"] = arrays[f"CNN_high_{k}/b_{part}"]
    state["token_encoder.proj.weight"] = arrays["CNN_proj/W_proj"].T
    state["token_encoder.proj.bias"] = arrays["CNN_proj/b_proj"]
    D, P = config.lstm_dim, config.projection_dim
    order = tf_gate_order(D)
    for direction, stack in ((0, "forward_lstm"), (1, "backward_lstm")):
        for k in range(config.n_layers):
            cell, prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell", f"{stack}.layers.{k}.lstm"
            W = arrays[f"{cell}/W_0"].T[order]            # (in + P, 4D) -> (4D, in + P), torch's gate order
            state[f"{prefix}.weight_ih_l0"] = W[:, :P]   # the input's columns (every layer's input is P wide)
            state[f"{prefix}.weight_hh_l0"] = W[:, P:]   # the recurrent output's
            state[f"{prefix}.weight_hr_l0"] = arrays[f"{cell}/W_P_0"].T      # (D, P) -> (P, D) projection
            # TF's LSTMCell has one bias B and adds 1.0 to the forget gate at run time (forget_bias). torch
            # has two biases and adds both: B goes into bias_ih as it is, and the 1.0 into bias_hh, so the
            # file's B is kept bit for bit and `official_weights` gives it back unchanged.
            state[f"{prefix}.bias_ih_l0"] = arrays[f"{cell}/B"][order]
            state[f"{prefix}.bias_hh_l0"] = forget_one(D)
    return {k: v.contiguous() for k, v in state.items()}


def forget_one(D: int):
    """(4D,) zeros with 1.0 at the forget gate (torch's order): TF's LSTMCell forget_bias."""
    b = torch.zeros(4 * D)
    b[D:2 * D] = 1.0
    return b


def official_weights(model: BiLM) -> tuple[dict, dict]:
    """Our biLM -> (options dict, {dataset name: float32 array}) in the published layout: the inverse of
    `state_from_official`, step by step, so bilm-tf and AllenNLP load a biLM trained here unchanged. The LM
    softmax is not part of it (the published files have none)."""
    config = model.config
    if config.token_encoder != "char":
        raise UserError("only character-CNN biLMs have a published layout (this one uses word embeddings)")
    s = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    arrays = {"char_embed": s["token_encoder.char_embed.weight"][1:]}          # drop the padding row
    for k in range(len(config.filters)):
        arrays[f"CNN/W_cnn_{k}"] = s[f"token_encoder.convs.{k}.weight"].permute(2, 1, 0)[None]
        arrays[f"CNN/b_cnn_{k}"] = s[f"token_encoder.convs.{k}.bias"]
    for k in range(config.n_highway):
        for part in ("transform", "carry"):
            arrays[f"CNN_high_{k}/W_{part}"] = s[f"token_encoder.highways.{k}.{part}.weight"].T
            arrays[f"CNN_high_{k}/b_{part}"] = s[f"token_encoder.highways.{k}.{part}.bias"]
    arrays["CNN_proj/W_proj"] = s["token_encoder.proj.weight"].T
    arrays["CNN_proj/b_proj"] = s["token_encoder.proj.bias"]
    order = tf_gate_order(config.lstm_dim)
    for direction, stack in ((0, "forward_lstm"), (1, "backward_lstm")):
        for k in range(config.n_layers):
            cell, prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell", f"{stack}.layers.{k}.lstm"
            W = torch.cat([s[f"{prefix}.weight_ih_l0"], s[f"{prefix}.weight_hh_l0"]], dim=1)  # (4D, in + P)
            arrays[f"{cell}/W_0"] = W[order].T
            # B = bias_ih + bias_hh - the 1.0 TF adds itself; bias_hh - 1.0 is exactly 0 for converted weights
            b_hh = s[f"{prefix}.bias_hh_l0"] - forget_one(config.lstm_dim)
            arrays[f"{cell}/B"] = (s[f"{prefix}.bias_ih_l0"] + b_hh)[order]
            arrays[f"{cell}/W_P_0"] = s[f"{prefix}.weight_hr_l0"].T
    options = {
        "lstm": {"use_skip_connections": config.residual, "projection_dim": config.projection_dim,
                 # null, not 0: TensorFlow's LSTMCell would clip at 0 (AllenNLP and bilm-tf read null as off)
                 "cell_clip": config.cell_clip or None, "proj_clip": config.proj_clip or None,
                 "dim": config.lstm_dim, "n_layers": config.n_layers},
        "char_cnn": {"activation": "relu", "filters": config.filters, "n_highway": config.n_highway,
                     "embedding": {"dim": config.char_embed_dim}, "n_characters": config.n_characters,
                     "max_characters_per_token": MAX_CHARS}}
    return options, {name: arrays[name].contiguous().numpy() for name, _ in official_layout(config)}


def export_official(model: BiLM, out_dir: str) -> tuple[str, str]:
    """Write `out_dir/options.json` and `out_dir/weights.hdf5` (the published layout). Both are written
    under temporary names first and renamed at the end: an interrupted export leaves no half file."""
    import h5py
    options, arrays = official_weights(model)
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "options.json"), os.path.join(out_dir, "weights.hdf5")
    tmp = [p + ".tmp" for p in paths]
    try:
        with open(tmp[0], "w") as f:
            json.dump(options, f)
        with h5py.File(tmp[1], "w") as h5:
            for name, array in arrays.items():
                h5.create_dataset(name, data=array)
        for t, p in zip(tmp, paths):
            os.replace(t, p)
    finally:
        for t in tmp:
            if os.path.exists(t):
                os.unlink(t)
    return paths


def convert_official(options_file: str, weights_file: str) -> dict:
    """A published pair of files -> one of our self-describing biLM checkpoints (tensors and plain
    containers; the config remembers the clipping). It has no vocabulary and no LM softmax: it gives ELMo
    vectors everywhere a train_lm.py checkpoint does, but no perplexity."""
    model = load_official_weights(options_file, weights_file)
    return {"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": asdict(model.config), "vocab": None,
            "model": model.state_dict(), "step": 0,
            "args": {"converted_from": {"options": os.path.abspath(options_file),
                                        "weights": os.path.abspath(weights_file)}}}


# ---------------------------------------------------------------------------------------------------------
# Runtime shared by the scripts: devices, parameter counts, one-line errors.
# ---------------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """'auto' -> cuda > mps > cpu. Asking for a device that is not there is a user error naming those that are."""
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) \
        + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    if name == "auto":
        return torch.device("cuda" if "cuda" in have else "mps" if "mps" in have else "cpu")
    if name.split(":")[0] not in have:
        raise UserError(f"--device {name} is not available here; available: {', '.join(have)}")
    return torch.device(name)


def task_optimizer(params, name: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The downstream scripts' optimizer: Adam, or SGD with momentum 0.9. Adam runs fused (one pass over
    each parameter instead of a dozen elementwise ops) on CPU and CUDA: on this project's CPU PyTorch's
    default loop took 7x as long over BCN's 26M parameters (489 against 67 ms, 1 thread), and the fused
    step makes a whole SST-2 BiLSTM training step 1.5x faster (README). The same update, up to the last
    bits."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)


def count_parameters(model: BiLM) -> dict:
    """Parameters of the biLM without the softmax (what AllenNLP publishes) and of the softmax."""
    head = sum(p.numel() for p in model.head.parameters()) if model.head is not None else 0
    total = sum(p.numel() for p in model.parameters())
    return {"bilm": total - head, "softmax": head, "total": total}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown or misspelt flags, bad values) are one line and exit 2, and
    whose --help shows the module docstring as written plus every default."""

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):   # append the default, where there is one worth showing
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in (action.help or ""):
                return (action.help or "") + " (default: %(default)s)"
            return action.help

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=self.Formatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def last_path(out: str) -> str:
    """Where a script keeps its latest state for --resume: lm.pt -> lm.last.pt."""
    return out[:-3] + ".last.pt" if out.endswith(".pt") else out + ".last.pt"


def write_metrics(path, metrics: dict):
    """--metrics-json: written atomically, like the checkpoints."""
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, path)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def abort_nonfinite(what: str, step: int, last: str):
    """A NaN/inf loss or weight: stop with exit status 3, naming the step and the last good checkpoint,
    which is left as it is (the scripts call this *before* writing a checkpoint)."""
    import sys
    good = last if os.path.exists(last) else "none written yet"
    print(f"error: {what} at step {step}; stopping without saving. Last good checkpoint: {good}. "
          f"Try a lower --lr.", file=sys.stderr)
    sys.exit(3)


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_main(main):
    """Run a script's main(): a UserError becomes one line on stderr and exit status 2."""
    import sys
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Tools around the model, as functions (importable) and as `python elmo.py convert | export | embed |
# neighbors` (the parser at the end).
# ---------------------------------------------------------------------------------------------------------
def embed_sentences(bilm: BiLM, sentences: list, batch_size: int = 64, progress=None):
    """Yield (index, layers) for every sentence: layers is (L+1, n, 2P), the sentence's n tokens in every
    ELMo layer, without <S> and </S>; an empty sentence gives (L+1, 0, 2P). Sentences go through the biLM in
    batches of similar length (sorted), so little is spent on padding; `progress(done_tokens)` is called
    after each batch. The biLM is stateless, so the order of the batches changes nothing."""
    device = next(bilm.parameters()).device
    width = 2 * bilm.config.projection_dim
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for i in (i for i in order if not sentences[i]):
        yield i, torch.zeros(bilm.config.n_layers + 1, 0, width)
    order = [i for i in order if sentences[i]]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        with torch.no_grad():
            layers = torch.stack(bilm(batch_to_ids([sentences[i] for i in batch]).to(device))["activations"],
                                 dim=1).float().cpu()                              # (B, L+1, T, 2P)
        for b, i in enumerate(batch):
            yield i, layers[b, :, :len(sentences[i])]
        if progress:
            progress(sum(len(sentences[i]) for i in batch))


class Progress:
    """A progress line on stderr every few seconds: done / total, rate, ETA."""

    def __init__(self, what: str, total: int, unit: str, every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.start, self.last = 0, time.time(), 0.0

    def __call__(self, n: int):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            share = 100 * self.done / max(self.total, 1)
            log_stderr(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.0f}%)"
                       f" | {rate:,.0f} {self.unit}/s | ETA {fmt_time((self.total - self.done) / max(rate, 1e-9))}")


def embed_file(bilm: BiLM, input_path: str, output: str, layers: str = "all", batch_size: int = 64,
               tokenizer: str = "whitespace", encoding: str = "utf-8", job: dict | None = None,
               log=print) -> int:
    """ELMo vectors of every line of a text file -> HDF5, in the layout of AllenNLP's `allennlp elmo`
    command, so code that read those files reads these: one float32 dataset per line, named by the line's
    index ("0", "1", ...), shape (L+1, n, 2P) for layers="all", (n, 2P) for "top" (the last layer) and
    "average" (the mean of all L+1); and a dataset "sentence_to_index" holding the JSON map from each
    (stripped) line to its index. An empty line gets a dataset with n = 0 (AllenNLP refused such files), so
    dataset i is always line i.

    The file is written as `output + ".partial"` and renamed to `output` when complete. An interrupted run
    leaves the partial file; the same command (same `job`: input, model, options) continues from it."""
    import h5py
    from data import read_lines, tokenize
    lines = [text.strip() for _, text in read_lines(input_path, encoding)]
    sentences = [tokenize(text, tokenizer) for text in lines]
    job = json.dumps(job or {}, sort_keys=True)
    partial = output + ".partial"
    h5 = None
    if os.path.exists(partial):
        try:
            h5 = h5py.File(partial, "a")
            if h5.attrs.get("job") != job:
                log(f"{partial} is from another job (input, model or options differ): starting over")
                h5.close()
                h5 = None
            else:
                log(f"continuing {partial}: {len(h5):,} of {len(lines):,} lines already there")
        except OSError:
            log(f"{partial} is unreadable (interrupted while writing): starting over")
            h5 = None
    if h5 is None:
        h5 = h5py.File(partial, "w")
        h5.attrs["job"] = job
    try:
        todo = [i for i in range(len(sentences)) if str(i) not in h5]
        progress = Progress("embed", sum(len(sentences[i]) for i in todo), "tokens")
        for n, (i, vectors) in enumerate(embed_sentences(bilm, [sentences[i] for i in todo], batch_size,
                                                         progress)):
            if layers == "top":
                vectors = vectors[-1]                               # (L+1, n, 2P) -> (n, 2P)
            elif layers == "average":
                vectors = vectors.mean(dim=0)                       # (L+1, n, 2P) -> (n, 2P)
            h5.create_dataset(str(todo[i]), data=vectors.numpy())
            if n % batch_size == batch_size - 1:
                h5.flush()                                          # what a later run can continue from
        index = {text: str(i) for i, text in enumerate(lines)}
        if "sentence_to_index" in h5:                               # killed just before the rename
            del h5["sentence_to_index"]
        h5.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype(), data=[json.dumps(index)])
    finally:
        h5.close()
    os.replace(partial, output)
    return len(lines)


def nearest_words(bilm: BiLM, word: str, vocabulary: list, k: int = 5):
    """Layer 0 has one vector per word, whatever its context: the k words of `vocabulary` nearest to `word`
    by cosine of that vector (the paper's Table 4, GloVe row). -> [(word, cosine)]."""
    words = [w for w in dict.fromkeys(vocabulary) if w != word]
    with torch.no_grad():
        device = next(bilm.parameters()).device
        e = torch.cat([bilm.token_encoder(batch_to_ids([words[i:i + 4096]]).to(device))[0]
                       for i in range(0, len(words), 4096)]).float().cpu()         # (N, P)
        q = bilm.token_encoder(batch_to_ids([[word]]).to(device))[0].float().cpu()  # (1, P)
    cos = F.cosine_similarity(e, q)                                                    # (N,)
    top = cos.topk(min(k, len(words)))
    return [(words[j], float(c)) for c, j in zip(top.values, top.indices)]


def nearest_occurrences(bilm: BiLM, sentences: list, word: str, layer: int = -1, k: int = 5,
                        batch_size: int = 64):
    """Every occurrence of `word` in `sentences` (token lists), represented by ELMo layer `layer`; for each,
    its k nearest occurrences in *other* sentences by cosine (the paper's Table 4, biLM rows: the nearest
    uses of "play" are the ones in the same sense). -> occurrences [(sentence index, token position)] and,
    per occurrence, [(neighbour's occurrence index, cosine)]."""
    occurrences = [(s, t) for s, tokens in enumerate(sentences) for t, w in enumerate(tokens) if w == word]
    if len(occurrences) < 2:
        return occurrences, []
    used = sorted({s for s, _ in occurrences})
    vectors = {}
    for j, layers in embed_sentences(bilm, [sentences[s] for s in used], batch_size):
        vectors[used[j]] = layers[layer]                                               # (n, 2P)
    v = F.normalize(torch.stack([vectors[s][t] for s, t in occurrences]), dim=1)       # (O, 2P)
    cos = v @ v.T                                                                      # (O, O)
    same = torch.tensor([s for s, _ in occurrences])
    cos = cos.masked_fill(same.unsqueeze(0) == same.unsqueeze(1), float("-inf"))     # not the same sentence
    top = cos.topk(min(k, len(occurrences) - 1), dim=1)
    return occurrences, [[(int(j), float(c)) for c, j in zip(vals, idx) if c > float("-inf")]
                         for vals, idx in zip(top.values, top.indices)]


def _cli(argv=None):
    """`python elmo.py SUBCOMMAND`: one parser; each subcommand's --help shows an example; each runs as a
    function of its own below."""
    p = ArgumentParser(__doc__)
    sub = p.add_subparsers(dest="command", metavar="{convert,export,embed,neighbors}")

    def command(name, summary, example):
        return sub.add_parser(name, help=summary, description=f"{summary}\n\nexample:\n  {example}")

    def elmo_flags(q):
        q.add_argument("--elmo", required=True, help="biLM: a .pt checkpoint (train_lm.py, convert) or a "
                       "published *_weights.hdf5 (its options found beside it, or --elmo-options)")
        q.add_argument("--elmo-options", help="options JSON of a published weight file, when it is not "
                       "X_options.json or options.json beside X_weights.hdf5")
        q.add_argument("--lstm", default="auto", choices=["auto", "reference", "fused"],
                       help="auto: the faster exact path (the reference cell when the weights clip, as the "
                       "published ones do, and on a CPU); fused: nn.LSTM, which cannot clip")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
        q.add_argument("--tokenizer", default="whitespace", choices=["whitespace", "regex", "ptb"],
                       help="how lines become tokens (whitespace: the text is already tokenised)")
        q.add_argument("--batch-size", type=int, default=64, help="sentences per batch")

    q = command("convert", "published options JSON + weights HDF5 -> one of our .pt biLM checkpoints",
                "python elmo.py convert --options elmo_small_options.json --weights elmo_small_weights.hdf5 "
                "--out elmo_small.pt")
    q.add_argument("--options", required=True, help="the published options JSON")
    q.add_argument("--weights", required=True, help="the published weights HDF5")
    q.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    q = command("export", "our biLM checkpoint -> DIR/options.json + DIR/weights.hdf5 (the published "
                "layout, which AllenNLP and bilm-tf read)", "python elmo.py export --elmo lm.pt --out-dir lm_tf")
    q.add_argument("--elmo", required=True, help="a biLM checkpoint (train_lm.py)")
    q.add_argument("--out-dir", required=True, help="folder for options.json and weights.hdf5")
    q = command("embed", "ELMo vectors of every line of a text file -> HDF5 (AllenNLP's `allennlp elmo` "
                "layout)", "python elmo.py embed --elmo lm.pt --input sentences.txt --output vectors.hdf5")
    elmo_flags(q)
    q.add_argument("--input", required=True, help="text file, one sentence a line")
    q.add_argument("--output", required=True, help="HDF5 file to write (OUTPUT.partial until complete; "
                   "running the same command again continues an interrupted run)")
    q.add_argument("--layers", default="all", choices=["all", "top", "average"],
                   help="all: (L+1, n, 2P) per line; top: the last layer (n, 2P); average: their mean")
    q.add_argument("--encoding", default="utf-8", help="of --input")
    q = command("neighbors", "the paper's Table 4: the nearest other uses of a word, by a layer's cosine",
                "python elmo.py neighbors --elmo lm.pt --sentences reviews.txt --word play --k 3")
    elmo_flags(q)
    q.add_argument("--sentences", required=True, help="text file, one sentence a line")
    q.add_argument("--word", required=True, help="the word whose occurrences are compared")
    q.add_argument("--layer", type=int, default=-1, help="ELMo layer (0 = context-free token layer; "
                   "-1 = the top LSTM layer)")
    q.add_argument("--k", type=int, default=3, help="neighbours per occurrence")
    q.add_argument("--show", type=int, default=4, help="occurrences to show (the first ones in the file)")
    q.add_argument("--max-lines", type=int, default=0, help="read at most this many lines (0 = all)")
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return
    {"convert": convert_command, "export": export_command, "embed": embed_command,
     "neighbors": neighbors_command}[args.command](args)


def log_stderr(msg):
    """The commands' progress and notes go to stderr; stdout is for results."""
    import sys
    print(msg, file=sys.stderr, flush=True)


def convert_command(args):
    ckpt = convert_official(args.options, args.weights)
    atomic_save(ckpt, args.out)
    c = ckpt["config"]
    print(f"wrote {args.out}: biLM {c['n_layers']}x{c['lstm_dim']}_{c['projection_dim']}, clip "
          f"{c['cell_clip'] or 'off'}/{c['proj_clip'] or 'off'}; use it as --elmo {args.out}")


def export_command(args):
    paths = export_official(load_elmo(args.elmo), args.out_dir)
    print(f"wrote {paths[0]} and {paths[1]} (published layout; no LM softmax)")


def frozen_for_tools(args) -> BiLM:
    """The biLM of `embed` and `neighbors`: frozen, on --device, remembering tokens across batches."""
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    bilm = load_elmo(args.elmo, pick_device(args.device), impl=args.lstm, options=args.elmo_options)
    if bilm.config.token_encoder == "char":
        bilm.token_encoder.remember_tokens()
    return bilm


def embed_command(args):
    from data import check_file
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UserError(f"--output folder does not exist: {folder}")
    stat = os.stat(check_file(args.input, "--input"))
    bilm = frozen_for_tools(args)
    job = {"input": [os.path.abspath(args.input), stat.st_size, stat.st_mtime_ns],
           "elmo": os.path.abspath(args.elmo), "layers": args.layers, "tokenizer": args.tokenizer,
           "lstm": args.lstm}
    start = time.time()
    n = embed_file(bilm, args.input, args.output, args.layers, args.batch_size, args.tokenizer, args.encoding,
                   job, log_stderr)
    print(f"wrote {args.output}: {n:,} lines, layers {args.layers}, in {fmt_time(time.time() - start)}")


def neighbors_command(args):
    from data import read_lines, tokenize
    bilm = frozen_for_tools(args)
    lines = [text for _, text in read_lines(args.sentences)]
    lines = lines[:args.max_lines] if args.max_lines > 0 else lines
    sentences = [tokenize(text, args.tokenizer) for text in lines]
    if not -bilm.config.n_layers - 1 <= args.layer <= bilm.config.n_layers:
        raise UserError(f"--layer must be in 0..{bilm.config.n_layers} (or negative from the top)")
    occurrences, neighbours = nearest_occurrences(bilm, sentences, args.word, args.layer, args.k,
                                                  args.batch_size)
    if len(occurrences) < 2:
        raise UserError(f"'{args.word}' occurs {len(occurrences)} time(s) in {args.sentences}; need at least "
                        f"two (tokens are compared exactly, after --tokenizer {args.tokenizer})")
    layer = args.layer % (bilm.config.n_layers + 1)

    def context(s, t, width=8):
        tokens = sentences[s]
        left, right = " ".join(tokens[max(0, t - width):t]), " ".join(tokens[t + 1:t + 1 + width])
        more_left, more_right = t > width, t + 1 + width < len(tokens)
        return f"{'... ' if more_left else ''}{left} [{tokens[t]}] {right}{' ...' if more_right else ''}"

    vocabulary = [w for tokens in sentences for w in tokens][:2_000_000]
    close = ", ".join(f"{w} {c:.2f}" for w, c in nearest_words(bilm, args.word, vocabulary, 8))
    n_sentences = len({s for s, _ in occurrences})
    print(f"'{args.word}': {len(occurrences):,} occurrences in {n_sentences:,} sentences of "
          f"{args.sentences}; layer {layer} of {bilm.config.n_layers}, cosine\n")
    print(f"layer 0 has one vector for every '{args.word}', whatever the context; its nearest other words:\n"
          f"    {close}\n")
    for o in range(min(args.show, len(occurrences))):
        s, t = occurrences[o]
        print(f"line {s + 1}: {context(s, t)}")
        for j, c in neighbours[o]:
            print(f"    {c:.2f}  line {occurrences[j][0] + 1}: {context(*occurrences[j])}")
        print()


if __name__ == "__main__":
    run_main(_cli)
