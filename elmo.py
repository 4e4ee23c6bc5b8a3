"""ELMo in plain PyTorch: the bidirectional language model (biLM) and the frozen embedder built on it.

Peters et al., 2018, "Deep contextualized word representations" (arXiv:1802.05365). Read this file top to
bottom; it follows the order in which a sentence flows through the model:

    config -> character CNN -> highway -> LSTM cell -> LSTM stacks -> biLM with LM head
           -> scalar mix -> ELMo (the frozen biLM with its mixes) -> load_elmo
           -> speed paths: exact variants of the CNN and the cell, each tested equal to the plain one

Nothing else lives here. Beside it: `data.py` (text -> ids, corpora, batches), `published.py` (the published
formats), `downstream.py` (frozen features and the task training loop), `tools.py` (`python elmo.py convert |
export | embed | neighbors`), `runtime.py` (the scripts' plumbing).

What goes in, what comes out:

    ids = data.batch_to_ids([["The", "cat", "sat"], ["Hi"]])   # (B, T, W) character ids, 0 = padding
    bilm = load_elmo("lm.pt")                                   # frozen, eval mode, stateless
    out = bilm(ids)
    out["activations"]   # L+1 tensors (B, T, 2P): layer 0 = [e; e], layer k = [forward_k; backward_k]
    out["mask"]          # (B, T) bool, True at real tokens; activations are zero elsewhere

Published models load the same way: AllenNLP's `load_elmo("elmo_2x1024_128_2048cnn_1xhighway_weights.hdf5")`
(its options beside it, or `options=PATH`), the NLPL repository's and ELMoForManyLangs' folders or .zip files.
ELMoForManyLangs' also embed the word beside its characters, ids from their own dictionaries (`chars`, `words`).

Shape legend, used in every shape comment below:
    B batch, T tokens per sentence (with <S> and </S> where noted), W characters per token (50),
    C character-embedding dim, F total CNN filters, D LSTM cell, P LSTM projection (output),
    L LSTM layers, V softmax vocabulary, N number of (distinct) tokens fed to the character CNN.

Deviations from the paper / bilm-tf and from AllenNLP, and why:
  1. Stateless LSTMs. bilm-tf, AllenNLP, ELMoForManyLangs and simple_elmo carry the LSTM state from one batch
     into the next (so the same sentence gives other vectors on a second call). Every call here starts from
     zero state: a sentence's vectors depend on the sentence alone. The golden tests check that we match
     their *first* call and not their second.
  2. Two training contexts (train_lm.py --context). `stream` is bilm-tf's: 20-token windows of the running
     text (sentences joined with their <S> and </S>), the state carried from window to window by the training
     loop alone (`stream_nll`). bilm-tf reverses each sentence for the backward LM but keeps the sentences in
     text order, so its backward state holds the *previous* sentence; here the backward LM reads the whole
     text reversed, so its state holds what follows, its true history. `sentence` trains on whole sentences
     from zero state, as ELMo is used. Either way `BiLM.forward`, the ELMo features, starts from zero state.
  3. Softmax. bilm-tf trains with a sampled softmax (8192 samples) over 793k words. We offer a full softmax
     (default) and torch's adaptive softmax (Grave et al., 2017), which is cheap *and* properly normalised,
     so training loss and reported perplexity are exact. We do not implement the sampled softmax.
  4. Three LSTM paths over the same parameters: the reference cell, written as the equations (with the
     original's clipping); the same cell stepped on columns, a speed path for the CPU; and the fused
     `torch.nn.LSTM(proj_size=P)`, which cannot clip. Tests hold the three equal. `impl="auto"` runs the
     column cell where it must (clipping) and where it is faster (a CPU without gradients), else nn.LSTM.
  5. TensorFlow adds 1.0 to the forget-gate bias at run time. AllenNLP folds it into the stored bias; we
     keep it in torch's second bias (`bias_hh`, which TensorFlow does not have), so the file's bias is
     stored bit for bit and `export` writes it back unchanged. Our own models start with forget bias 1.0.
  6. The character CNN runs once per *distinct* token of a batch, only over the positions that can matter
     (`encode_distinct`; exact, tested against the per-token path). A frozen biLM also remembers token
     embeddings across batches (`TokenMemo`, bounded), as AllenNLP's `vocab_to_cache` without the vocabulary.
  7. Scalar-mix layer norm is AllenNLP's: mean and variance over all unmasked elements of the whole batch
     (not per token). It is faithful to AllenNLP's numbers, and so batch-dependent; it is off by default.
  8. Presets use no clipping (fused LSTM, fast); pass clip values of 3.0 to train as the paper did.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# nn.LSTM with proj_size runs torch's own fused kernel instead of oneDNN's; that is expected, not a problem
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

# elmo_pytorch is this project's modules as one package, in a clone and installed alike (elmo_pytorch/__init__.py)
from elmo_pytorch.data import PAD_ID, lexicon
from elmo_pytorch.runtime import UserError, load_checkpoint


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
    # word embeddings: the token encoder ("word": rows of the LM vocabulary or `words`), or beside the CNN
    word_embed_dim: int = 300
    # A model's own dictionaries, token -> id (ELMoForManyLangs' char.dic, word.dic; `data.Dictionaries`).
    # None: characters are UTF-8 bytes (AllenNLP's, bilm-tf's), words the LM vocabulary.
    chars: dict | None = field(default=None, repr=False)
    words: dict | None = field(default=None, repr=False)
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
    # for 2 CPU cores and a 15-minute budget, chosen by measurement (RESULTS.md):
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

    def __init__(self, config: ELMoConfig, pad_char: int):
        super().__init__()
        c = config
        # id 0 is a padding *token* (no characters at all) and embeds to zeros, as in AllenNLP; `pad_char`
        # fills a token's positions after its end mark (a learnt embedding: the CNN reads it)
        self.char_embed, self.pad_char = nn.Embedding(c.n_characters, c.char_embed_dim, padding_idx=PAD_ID), pad_char
        self.convs = nn.ModuleList(nn.Conv1d(c.char_embed_dim, n, width) for width, n in c.filters)
        self.max_width = max(width for width, _ in c.filters)
        self.highways = nn.ModuleList(Highway(c.n_filters) for _ in range(c.n_highway))
        # ELMoForManyLangs' models also embed the word, column 0 of a token's ids: [word; CNN] is projected
        self.word_embed = nn.Embedding(len(c.words) + 1, c.word_embed_dim, padding_idx=PAD_ID) if c.words else None
        self.proj = nn.Linear(c.n_filters + (c.word_embed_dim if c.words else 0), c.projection_dim)
        self.unique = True       # speed path: once per distinct token (exact); bench.py turns it off to measure
        self.memo = None         # speed path for a frozen biLM: a TokenMemo (remember_tokens), else None

    def encode_tokens(self, ids):                       # (N, W) -> (N, P); with a word id first (N, 1+W)
        words, chars = (ids[:, 0], ids[:, 1:]) if self.word_embed is not None else (None, ids)
        x = self.char_embed(chars).transpose(1, 2)      # (N, W) -> (N, W, C) -> (N, C, W) for Conv1d
        # Max-pool over positions *before* the activation, as in bilm-tf (relu is monotonic, so this is the
        # same as relu-then-pool, and cheaper: the activation runs on (N, F) instead of (N, F, W)).
        pooled = [conv(x).max(dim=2).values for conv in self.convs]   # each (N, F_k)
        h = F.relu(torch.cat(pooled, dim=1))            # (N, F)
        for highway in self.highways:
            h = highway(h)
        h = h if words is None else torch.cat([self.word_embed(words), h], dim=1)   # [word; CNN]: (N, E + F)
        return self.proj(h)                             # (N, F) -> (N, P)

    def forward(self, chars, unique: bool | None = None):   # (B, T, W) -> (B, T, P)
        B, T, W = chars.shape
        if self.unique if unique is None else unique:   # the same numbers, less work: see the speed paths
            return encode_distinct(self, chars)
        return self.encode_tokens(chars.reshape(B * T, W)).reshape(B, T, -1)   # (B*T, W) -> (B, T, P)

    def remember_tokens(self, max_tokens: int | None = None):
        """Keep every token's embedding across calls, for a frozen biLM: it depends on the token alone, so a
        word seen before skips the CNN. At most `max_tokens` (default: TOKEN_MEMO_MIB's worth); 0: off."""
        if max_tokens is None:
            max_tokens = TOKEN_MEMO_MIB * 2 ** 20 // (4 * self.proj.out_features)
        self.memo = TokenMemo(max_tokens) if max_tokens > 0 else None


class WordEncoder(nn.Module):
    """The word-embedding alternative (as in the notebook this project grew from, and ELMoForManyLangs'
    models without characters): one vector per word of the LM vocabulary (or of `words`), projected to P.
    Cannot represent words outside the vocabulary (they map to <unk>)."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        rows = len(config.words) + 1 if config.words else config.vocab_size    # + our id 0, "no word"
        self.embed = nn.Embedding(rows, config.word_embed_dim, padding_idx=PAD_ID)
        self.proj = nn.Linear(config.word_embed_dim, config.projection_dim)

    def forward(self, words, unique: bool = True):      # (B, T) -> (B, T, P)
        return self.proj(self.embed(words))


# ---------------------------------------------------------------------------------------------------------
# LSTM with a projection (Sak et al., 2014), one layer, one direction; two implementations, one parameter set.
# ---------------------------------------------------------------------------------------------------------
class LstmLayer(nn.Module):
    """One LSTM layer with cell D and projected output P (Sak et al., 2014), one direction. The parameters
    are an `nn.LSTM(proj_size=P)`'s, so torch's fused kernel can run them (`fused`); `reference` runs the
    same parameters one explicit step at a time, as the equations read, with the original's clipping.
    Gate order (torch's): input i, forget f, cell candidate g, output o."""

    def __init__(self, input_dim: int, config: ELMoConfig):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, config.lstm_dim, proj_size=config.projection_dim, batch_first=True)
        self.cell_clip, self.proj_clip = config.cell_clip, config.proj_clip
        with torch.no_grad():  # forget-gate bias 1.0, the value TensorFlow's LSTMCell adds at run time
            D = config.lstm_dim
            self.lstm.bias_ih_l0[D:2 * D].fill_(1.0)
            self.lstm.bias_hh_l0[D:2 * D].zero_()

    # Every path takes an optional initial state (h (B, P), c (B, D)) and returns the final one with the
    # outputs. None means zero state, which is what ELMo's features use: only the stream-mode training and
    # evaluation loop passes a state, explicitly, from one window of text to the next.
    def forward(self, x, impl: str = "reference", state=None):    # (B, T, in) -> (B, T, P), state
        run = {"reference": self.reference, "columns": lstm_columns, "fused": self.fused}[impl]
        return run(x, state) if impl != "columns" else run(self, x, state)

    def reference(self, x, state=None):                 # (B, T, in) -> (B, T, P), state
        lstm = self.lstm
        B, T, _ = x.shape
        h = x.new_zeros(B, lstm.proj_size) if state is None else state[0]          # h_0 = 0 (B, P)
        c = x.new_zeros(B, lstm.hidden_size) if state is None else state[1]        # c_0 = 0 (B, D)
        outputs = []
        for t in range(T):
            # all four gates at once: W_i x_t + b_i + W_h h_{t-1} + b_h, split (B, 4D) -> 4 x (B, D)
            gates = F.linear(x[:, t], lstm.weight_ih_l0, lstm.bias_ih_l0) \
                + F.linear(h, lstm.weight_hh_l0, lstm.bias_hh_l0)
            i, f, g, o = gates.chunk(4, dim=1)
            i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)      # input, forget, output gates
            g = torch.tanh(g)                                                    # candidate cell
            c = f * c + i * g                                # c_t = f_t * c_{t-1} + i_t * g_t
            if self.cell_clip:                               # bilm-tf's cell_clip: c_t in [-clip, clip]
                c = c.clamp(-self.cell_clip, self.cell_clip)
            h = F.linear(o * torch.tanh(c), lstm.weight_hr_l0)   # h_t = W_P (o_t * tanh(c_t)): (B, D) -> (B, P)
            if self.proj_clip:                               # bilm-tf's proj_clip: h_t in [-clip, clip]
                h = h.clamp(-self.proj_clip, self.proj_clip)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)       # T x (B, P) -> (B, T, P)

    def fused(self, x, state=None):                     # (B, T, in) -> (B, T, P), state
        if self.cell_clip or self.proj_clip:
            raise ValueError("the fused nn.LSTM path cannot clip; use impl 'reference' or 'columns', or clip 0")
        hx = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))   # (1, B, P), (1, B, D)
        out, (h, c) = self.lstm(x, hx)
        return out, (h[0], c[0])


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
            h, layer_state = layer(inp, impl, None if state is None else state[k])
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
        self.lexicon = lexicon(config)                 # text -> this model's ids (data.py), and its <S>, </S>
        self.token_encoder = CharCNN(config, self.lexicon.pad_char) if config.token_encoder == "char" \
            else WordEncoder(config)
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
        """The LSTM path that runs: `impl`, or for "auto" the fastest exact one (`auto_lstm_path`)."""
        return auto_lstm_path(self) if self.impl == "auto" else self.impl

    def freeze(self) -> "BiLM":
        """Frozen ELMo (paper section 3.3): eval mode (no dropout), no gradients, and the token memo on, so
        that each word goes through the character CNN once (`TokenMemo`; the numbers are the same)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if isinstance(self.token_encoder, CharCNN) and self.token_encoder.memo is None:
            self.token_encoder.remember_tokens()
        return self.eval()

    def add_boundaries(self, inputs):
        """Wrap each sentence in <S> ... </S>: (B, T, W) -> (B, T+2, W) char ids, or (B, T) -> (B, T+2) word
        ids. Returns the new inputs, the new mask (B, T+2) and the lengths with boundaries (B,)."""
        mask = (inputs > 0).any(dim=-1) if inputs.dim() == 3 else inputs > 0    # (B, T)
        lengths = mask.sum(dim=1)                                            # (B,)
        B = inputs.shape[0]
        out = inputs.new_zeros(B, inputs.shape[1] + 2, *inputs.shape[2:])    # (B, T+2[, W])
        out[:, 1:-1] = inputs
        rows = torch.arange(B, device=inputs.device)
        bos, eos = self.lexicon.boundaries(inputs.device)                    # the ids of <S>, </S>: (W,) or ()
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
# ELMo: a frozen biLM and task-specific scalar mixes (paper section 3.3).
# ---------------------------------------------------------------------------------------------------------
class Elmo(nn.Module):
    """Frozen biLM + `n_outputs` scalar mixes + dropout. Only the mixes train (`requires_grad=True`: the
    biLM too, AllenNLP's fine-tuning). As AllenNLP's `Elmo`, the mix runs over the layers *with* <S>/</S>
    (so layer-norm statistics match it), then drops them. `layers()` is the expensive, frozen part; its
    output can be cached per example and fed to `mix()`."""

    def __init__(self, bilm: BiLM, n_outputs: int = 1, layer_norm: bool = False, dropout: float = 0.5,
                 requires_grad: bool = False):
        super().__init__()
        self.bilm = bilm.freeze().requires_grad_(requires_grad)   # eval mode (no dropout), the token memo on
        self.requires_grad = requires_grad
        self.mixes = nn.ModuleList(ScalarMix(bilm.config.n_layers + 1, layer_norm) for _ in range(n_outputs))
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * bilm.config.projection_dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.bilm.eval()                                # the biLM never leaves eval mode (no dropout)
        return self

    def layers(self, inputs):
        """(B, T, W) ids (`bilm.lexicon.ids`) -> L+1 layers (B, T+2, 2P) with boundaries, the mask (B, T+2)."""
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            out = self.bilm(inputs, boundaries=True)
        return out["activations"], out["mask"]

    def mix(self, layers, mask_bos_eos):
        """L+1 x (B, T+2, 2P) -> n_outputs x (B, T, 2P): mix, drop the boundaries, dropout."""
        return [self.dropout(remove_boundaries(mix(layers, mask_bos_eos), mask_bos_eos))
                for mix in self.mixes]

    def forward(self, inputs):
        layers, mask_bos_eos = self.layers(inputs)
        return {"elmo_representations": self.mix(layers, mask_bos_eos), "mask": mask_bos_eos[:, 2:]}

    def l2_penalty(self):
        """sum ||w||^2 of the mix weights: the paper's lambda term, pulls the mix towards an average."""
        return sum((mix.weights ** 2).sum() for mix in self.mixes)


def count_parameters(model: BiLM) -> dict:
    """Parameters of the biLM without the softmax (what AllenNLP publishes) and of the softmax."""
    head = sum(p.numel() for p in model.head.parameters()) if model.head is not None else 0
    total = sum(p.numel() for p in model.parameters())
    return {"bilm": total - head, "softmax": head, "total": total}


def bilm_from_checkpoint(ckpt: dict, impl: str = "auto") -> BiLM:
    """Rebuild a biLM from a checkpoint's config and weights: no sizes asked for again."""
    model = BiLM(ELMoConfig.from_dict(ckpt["config"]), impl=impl)
    model.load_state_dict(ckpt["model"])
    model.vocab = ckpt.get("vocab")
    return model


def load_elmo(path: str, device="cpu", impl: str = "auto", options: str | None = None) -> BiLM:
    """The public entry point: a biLM checkpoint (`train_lm.py`, `python elmo.py convert`) or a published
    model -> frozen biLM in eval mode. Published: AllenNLP's `*.hdf5` weights (its options found beside it, or
    named by `options=`), a folder or `.zip` of the NLPL repository or of ELMoForManyLangs (`read_published`)."""
    if os.path.isdir(path) or str(path).endswith((".hdf5", ".h5", ".zip")):
        from elmo_pytorch.published import read_published   # the file formats: read only when asked
        config, state = read_published(str(path), options)
        ckpt = {"config": config, "model": state, "vocab": None}
    else:
        ckpt = load_checkpoint(path, "bilm")
    model = bilm_from_checkpoint(ckpt, impl)
    if impl == "fused" and (model.config.cell_clip or model.config.proj_clip):
        raise UserError(f"{path} clips its LSTM cells/outputs (the published weights do), which the fused nn.LSTM "
                        f"cannot: use the reference cell (impl 'auto', 'columns' or 'reference')")
    return model.to(device).freeze()


# ---------------------------------------------------------------------------------------------------------
# Speed paths. Each computes what the plain path above computes (tests hold them equal), with less work or
# in a layout the hardware prefers. Skip this section to understand ELMo; read it to know why it is fast.
# ---------------------------------------------------------------------------------------------------------
TOKEN_MEMO_MIB = 256   # the token memo's bound: rows of P floats; CharCNN.remember_tokens(max_tokens) sets it


def encode_distinct(cnn: CharCNN, chars):               # (B, T, W) -> (B, T, P), as cnn.encode_tokens per token
    B, T, W = chars.shape
    flat = chars.reshape(B * T, W)                      # (B, T, W) -> (B*T, W)
    # 1) Trim character positions that cannot change the result. A window of width k touches a real
    #    character only if it starts before the longest word ends (at `longest`); every window after
    #    that sees only the pad character and gives the same value. Keeping `longest + max_width`
    #    positions keeps every distinct window value, so the max-pool is unchanged. (Exact.)
    longest = int(token_width(cnn, flat).max()) if flat.numel() else 0
    flat = flat[:, : min(W, longest + cnn.max_width)]
    # 2) Run the CNN once per distinct token of the batch: a sentence batch repeats "the", "," ...
    #    many times, and the CNN is the same function for each copy. (Exact.)
    distinct, inverse = torch.unique(flat, dim=0, return_inverse=True)   # (N, W'), (B*T,)
    # 3) A frozen biLM also remembers tokens from earlier batches (never under gradients or in training).
    if cnn.memo is not None and not cnn.training and not torch.is_grad_enabled():
        return cnn.memo.lookup(cnn, distinct)[inverse].reshape(B, T, -1)
    return cnn.encode_tokens(distinct)[inverse].reshape(B, T, -1)        # (N, P) -> (B, T, P)


def token_width(cnn: CharCNN, ids):                     # (N, W') -> (N,)
    """How many leading positions of each token's ids hold the token: its word id (a model with word
    embeddings), its marks and characters; after them come only padding characters."""
    first = 0 if cnn.word_embed is None else 1
    return first + ((ids[:, first:] != PAD_ID) & (ids[:, first:] != cnn.pad_char)).sum(dim=1)


class TokenMemo:
    """Token -> its embedding, kept across calls of a frozen biLM (AllenNLP's `vocab_to_cache`, without
    naming the vocabulary in advance): a word seen in an earlier batch does not go through the CNN, highway
    and projection again. Bounded: up to `max_tokens` rows of P floats (TOKEN_MEMO_MIB by default); later
    new tokens are computed every time. Emptied when the CNN's weights, device or dtype change, so it never
    returns what older weights computed. The same numbers as computing them, to float rounding (a row
    computed in another batch)."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.rows, self.table, self.made_by = max_tokens, {}, None, None

    def __len__(self):
        return len(self.rows)

    def lookup(self, cnn: CharCNN, distinct):           # (N, W') -> (N, P), from the memo where it can
        made_by = (tuple(p._version for p in cnn.parameters()), distinct.device, torch.get_autocast_dtype(
            distinct.device.type) if torch.is_autocast_enabled(distinct.device.type) else None)
        if made_by != self.made_by:                     # new weights, device or dtype: start empty
            self.rows, self.table, self.made_by = {}, None, made_by
        # the key: a token's ids up to its end-of-word mark (the trimmed width varies per batch)
        keys = [tuple(row[:n]) for row, n in zip(distinct.tolist(), token_width(cnn, distinct).tolist())]
        rows = [self.rows.get(k, -1) for k in keys]
        new = [i for i, r in enumerate(rows) if r < 0]
        if new:
            computed = cnn.encode_tokens(distinct[new])                     # (new, P)
            room = min(len(new), self.max_tokens - len(self.rows))
            if room > 0:
                start = len(self.rows)
                if self.table is None or start + room > len(self.table):    # grow by doubling
                    grown = computed.new_empty(max(2 * (start + room), 1024), computed.shape[1])
                    if self.table is not None:
                        grown[:start] = self.table[:start]
                    self.table = grown
                self.table[start: start + room] = computed[:room]
                for j in range(room):
                    self.rows[keys[new[j]]] = rows[new[j]] = start + j
        if all(r >= 0 for r in rows):
            return self.table[torch.tensor(rows, dtype=torch.long, device=distinct.device)]
        out = computed.new_empty(len(rows), computed.shape[1])              # the memo is full:
        out[new] = computed                                                 # new tokens as computed,
        fresh = set(new)
        known = [i for i, r in enumerate(rows) if r >= 0 and i not in fresh]
        if known:                                                           # the others from the memo
            out[known] = self.table[torch.tensor([rows[i] for i in known], device=distinct.device)]
        return out


def lstm_columns(layer: LstmLayer, x, state=None):      # (B, T, in) -> (B, T, P), state: LstmLayer.reference
    lstm = layer.lstm
    B, T, _ = x.shape
    # The reference cell's arithmetic, stepped on columns: the state is h^T (P, B), and each step computes
    # W_hh @ h^T rather than h @ W_hh^T. A (4D, P) @ (P, B) product with a small B runs faster on a CPU than
    # (B, P) @ (P, 4D), and it is most of the cell's time (RESULTS.md). The weights are used as stored.
    # The input's share of every gate, for all steps in one matmul; only the recurrence is sequential.
    columns = x.permute(2, 1, 0).reshape(x.shape[2], T * B)                      # (in, T*B)
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).unsqueeze(1)                      # (4D, 1)
    gates_x = torch.addmm(bias, lstm.weight_ih_l0, columns).view(-1, T, B)     # (4D, T, B)
    if state is None:                                   # zero state: every call starts fresh
        h, c = x.new_zeros(lstm.proj_size, B), x.new_zeros(lstm.hidden_size, B)  # (P, B), (D, B)
    else:
        h, c = state[0].T, state[1].T
    outputs = []
    for t in range(T):
        gates = gates_x[:, t]                                                 # (4D, B)
        if t > 0 or state is not None:                  # from zero state, W_hh @ h is exactly 0: skip it
            gates = torch.addmm(gates, lstm.weight_hh_l0, h)                  # + (4D, P) @ (P, B)
        i, f, g, o = gates.chunk(4, dim=0)                                    # 4 x (D, B)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)           # new memory cell
        if layer.cell_clip:
            c = c.clamp(-layer.cell_clip, layer.cell_clip)
        h = lstm.weight_hr_l0 @ (torch.sigmoid(o) * torch.tanh(c))            # (P, D) @ (D, B) projection
        if layer.proj_clip:
            h = h.clamp(-layer.proj_clip, layer.proj_clip)
        outputs.append(h)
    out = torch.stack(outputs).permute(2, 0, 1).contiguous()         # T x (P, B) -> (B, T, P)
    return out, (h.T, c.T)                                            # (B, P), (B, D)


def auto_lstm_path(bilm: BiLM) -> str:
    """impl='auto': the exact path that is faster. The column cell when the weights clip (nn.LSTM cannot)
    and on a CPU without gradients (frozen ELMo features, where it beats torch's LSTM-with-projection
    kernel: RESULTS.md); nn.LSTM otherwise (training, GPUs)."""
    if bilm.config.cell_clip or bilm.config.proj_clip:
        return "columns"
    on_cpu = next(bilm.parameters()).device.type == "cpu"
    return "columns" if on_cpu and not torch.is_grad_enabled() else "fused"

if __name__ == "__main__":          # the tools' command line: python elmo.py convert|export|embed|neighbors
    from elmo_pytorch.tools import cli
    cli()
