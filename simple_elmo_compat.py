"""simple_elmo's API on this project's model, without TensorFlow: code written for it runs here after one line.

    from simple_elmo import ElmoModel   ->   from simple_elmo_compat import ElmoModel

    model = ElmoModel()
    model.load("223.zip")                 # an NLPL repository archive, read in place (or its folder)
    vectors = model.get_elmo_vectors([["Det", "er", "en", "fin", "dag"], ["Hei", "!"]])
    vectors.shape                         # (2, 5, 1024) float64: the average of the layers, zeros after a text
    model.get_elmo_vector_average(texts)  # (2, 1024): each text's mean vector, of length 1

The same names, arguments, defaults, return types, dtypes and shapes as simple_elmo 0.9.2 (ltgoslo/simple_elmo,
its last release): `ElmoModel()`, `load(directory, max_batch_size=32, limit=100, full=False)`,
`get_elmo_vectors(texts, warmup=True, layers="average", session=None)`, `get_elmo_vector_average(...)` (the
same arguments) and `get_elmo_substitutes(data, topn=3, nodelimiters=True)`; `layers` is "average", "top" or
"all". And the same numbers: the tests hold them to simple_elmo's own on the model in testdata/nlpl. This
module only translates: the archive is read by `load_elmo` (`published.read_nlpl`: bilm-tf's weights, read as
AllenNLP's; ELMoForManyLangs' archives of the repository load too, which simple_elmo cannot read), the network
is `elmo.BiLM`, the one every format runs on.

Where this differs from simple_elmo, on purpose:
  1. Stateless. simple_elmo carries its LSTM state from batch to batch within a call (and `warmup` runs the
     first batch once more to hide it), so a text's vectors depend on the texts before it and on
     max_batch_size. Here they depend on the text alone: they equal simple_elmo's on a fresh model with
     warmup=False and every text in one batch. `warmup` is accepted and changes nothing.
  2. A text's average is over its own words. simple_elmo divides by the longest text of the batch and adds
     what it holds at the padding of shorter texts (the character CNN's vector of an empty token, in layer 0);
     on texts of one length the two agree. With layers="all" simple_elmo's average also reshapes
     (texts, layers, words, D) to (texts, words, layers, D) without transposing, which mixes positions and
     layers; ours is each layer's mean over the words. After a text, get_elmo_vectors gives zeros in every
     layer (simple_elmo: zeros in "top", the empty token's vector in the others).
  3. `session` (a TensorFlow session there) and `limit` and vocab.txt (which only save time there: our
     token memo does their job) are accepted and ignored. `max_batch_size` is how many texts go through the
     biLM at once; texts of similar length are batched together (the numbers cannot change).
  4. `full=True` and `get_elmo_substitutes` need the language model's softmax, which the NLPL archives do not
     hold: they work with this project's own checkpoints (`train_lm.py`), and a TensorFlow checkpoint is one
     clear error. The substitutes of each word come from the whole sentence on each side (simple_elmo's
     reset the LSTM state at every word, so they saw one word of context), every input sentence gets its
     list, in input order, whatever max_batch_size is (simple_elmo dropped the sentences still in its
     buffers at the end, refused fewer sentences than max_batch_size, and returned them in the order they
     finished); "logp" is the log-probability (simple_elmo's held unnormalised scores), and the candidates
     come best first. "word" is the text's word.
  5. An empty sentence gives zeros (an empty list of texts, non-string tokens, a folder without a weight
     file, a damaged archive, options that do not fit the weights: a ValueError or FileNotFoundError naming
     it; simple_elmo exited or crashed).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from elmo_pytorch.data import token_lists
from elmo_pytorch.elmo import load_elmo
from elmo_pytorch.tools import embed_by_length

LAYERS = ("average", "top", "all")


class ElmoModel:
    """simple_elmo's `ElmoModel`: `load` a model, then ELMo vectors for texts (lists of tokens)."""

    def __init__(self):
        self.bilm = None
        self.batch_size = self.max_chars = self.vector_size = self.n_layers = self.vocab = None
        self.session = None                                    # simple_elmo's TensorFlow session: none here

    def load(self, directory, max_batch_size: int = 32, limit: int = 100, full: bool = False) -> str:
        """A model -> ready: an NLPL archive (.zip) or its folder (model.hdf5 or the first *.hdf5, and
        options.json), anything else `load_elmo` reads, and with full=True one of this project's checkpoints
        (the LM softmax, for `get_elmo_substitutes`)."""
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a whole number >= 1, not {max_batch_size!r}")
        path = os.fspath(directory)
        if full and os.path.isdir(path) and any(name == "checkpoint" or ".ckpt" in name for name in os.listdir(path)):
            raise ValueError(f"{path} holds a TensorFlow checkpoint, which this project does not run (no "
                             f"TensorFlow): full=True takes one of this project's biLM checkpoints (train_lm.py), "
                             f"which hold the language model's softmax")
        bilm = load_elmo(path)
        if full and (bilm.head is None or not bilm.vocab):
            raise ValueError(f"full=True needs the language model's softmax and vocabulary, which {path} does not "
                             f"hold (bilm-tf's weight files leave them out, so the NLPL archives have none): pass "
                             f"one of this project's checkpoints (train_lm.py), or full=False for vectors")
        self.bilm, self.batch_size, self.max_chars = bilm, max_batch_size, 50
        self.vector_size, self.n_layers = 2 * bilm.config.projection_dim, bilm.config.n_layers + 1
        self.vocab = bilm.vocab if full else None
        return "The model is now loaded."

    def get_elmo_vectors(self, texts, warmup: bool = True, layers: str = "average", session=None) -> np.ndarray:
        """Texts (lists of tokens) -> float64 (texts, longest, D), or (texts, layers, longest, D) for
        layers="all": "average" the mean of the layers, "top" the last; zeros after each text."""
        texts = self._texts(texts, layers)
        longest = max(len(t) for t in texts)
        shape = (len(texts), self.n_layers, longest, self.vector_size) if layers == "all" \
            else (len(texts), longest, self.vector_size)
        out = np.zeros(shape)
        for i, vectors in self._layers(texts):                 # (L+1, n, D) per text
            n = vectors.shape[1]
            if layers == "all":
                out[i, :, :n] = vectors
            else:
                out[i, :n] = vectors[-1] if layers == "top" else vectors.mean(axis=0)
        return out

    def get_elmo_vector_average(self, texts, warmup: bool = True, layers: str = "average",
                                session=None) -> np.ndarray:
        """Texts -> float64 (texts, D), or (texts, layers, D) for layers="all": the mean over each text's
        own words, scaled to length 1 (for "all", the whole (layers, D) matrix); zeros for an empty text."""
        texts = self._texts(texts, layers)
        out = np.zeros((len(texts), self.n_layers, self.vector_size) if layers == "all"
                       else (len(texts), self.vector_size))
        for i, vectors in self._layers(texts):
            if vectors.shape[1] == 0:
                continue
            mean = vectors.mean(axis=1)                               # (L+1, D): each layer over the words
            mean = mean if layers == "all" else mean[-1] if layers == "top" else mean.mean(axis=0)
            out[i] = mean / np.linalg.norm(mean)
        return out

    def get_elmo_substitutes(self, data, topn: int = 3, nodelimiters: bool = True) -> list:
        """Sentences (strings, split at whitespace, or token lists) -> for each, for each word: {"word",
        "forward": {"candidates", "candidate_words", "logp"}, "backward": {...}}: the `topn` words the forward
        LM predicts at that position from the words before it, and the backward LM from the words after it,
        best first, with their log-probabilities. nodelimiters: never <S> or </S> among the candidates."""
        if self.vocab is None:
            raise ValueError("get_elmo_substitutes needs a model loaded with full=True (one of this project's "
                             "checkpoints: the language model's softmax)")
        if isinstance(topn, bool) or not isinstance(topn, int) or topn < 1:
            raise ValueError(f"topn must be a whole number >= 1, not {topn!r}")
        if not isinstance(data, (str, bytes)) and hasattr(data, "__iter__"):
            data = [s.split() if isinstance(s, str) else s for s in data]          # raw sentences, as there
        sentences = not_empty(token_lists(data, "data", "sentence"), "data")
        banned = [i for i, w in enumerate(self.vocab) if w == "<pad>" or (nodelimiters and w in ("<S>", "</S>"))]
        out = [[] for _ in sentences]
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        for start in range(0, len(order), self.batch_size):
            rows = [i for i in order[start:start + self.batch_size] if sentences[i]]    # an empty one gets []
            if not rows:
                continue
            batch = [sentences[i] for i in rows]
            with torch.no_grad():
                ids, _, _ = self.bilm.add_boundaries(self.bilm.lexicon.ids(batch))   # <S> w_1 .. w_n </S>
                _, forward, backward = self.bilm.encode(ids)
                # word k (1..n) at position k: the forward LM read positions < k, the backward LM positions > k
                fwd = log_probs(self.bilm, forward[-1][:, :-2])                    # (B, T, V): predicts k
                bwd = log_probs(self.bilm, backward[-1][:, 2:])
                fwd[..., banned] = bwd[..., banned] = float("-inf")
                f_top, b_top = fwd.topk(topn, dim=-1), bwd.topk(topn, dim=-1)
            for b, i in enumerate(rows):
                out[i] = [{"word": word,
                           "forward": self._candidates(f_top.indices[b, k], f_top.values[b, k]),
                           "backward": self._candidates(b_top.indices[b, k], b_top.values[b, k])}
                          for k, word in enumerate(sentences[i])]
        return out

    # ---- helpers ----
    def _candidates(self, ids, values) -> dict:
        ids = ids.tolist()
        return {"candidates": ids, "candidate_words": [self.vocab[i] for i in ids],
                "logp": [round(float(v), 4) for v in values]}

    def _layers(self, texts):
        """(index, (L+1, n, D) float32 numpy) for every text, batches of similar length."""
        if self.bilm is None:
            raise ValueError("no model loaded: call load(directory) first")
        for i, layers in embed_by_length(self.bilm, texts, self.batch_size):
            yield i, layers.numpy()

    def _texts(self, texts, layers) -> list:
        if layers not in LAYERS:
            raise ValueError(f"layers must be one of {', '.join(LAYERS)}, not {layers!r}")
        return not_empty(token_lists(texts, "texts", "text"), "texts")


def not_empty(sentences: list, name: str) -> list:
    """simple_elmo's methods take at least one text (it crashed on none)."""
    if not sentences:
        raise ValueError(f"{name} is empty: pass at least one sentence")
    return sentences


def log_probs(bilm, h):                                   # (..., P) -> (..., V)
    """The biLM's LM log-probabilities at every position: its softmax (full, or torch's adaptive one)."""
    if isinstance(bilm.head, nn.Linear):
        return F.log_softmax(bilm.head(h).float(), dim=-1)
    return bilm.head.log_prob(h.float().reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
