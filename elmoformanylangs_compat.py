"""ELMoForManyLangs' API on this project's model: code written for it runs here after one line.

    from elmoformanylangs import Embedder   ->   from elmoformanylangs_compat import Embedder

    e = Embedder("zhs.model")                       # a published model folder (or its .zip); batch_size=64
    vectors = e.sents2elmo([["今", "天", "天气", "真", "好"], ["潮水", "退", "了"]])
    vectors[0].shape                                # (5, 1024) float32: the average of the 3 layers
    e.sents2elmo(sentences, output_layer=-2)[0]     # (3, 5, 1024): all three; 0, 1 or 2: that layer

The same names, arguments, defaults and return types as ELMoForManyLangs (HIT-SCIR/ELMoForManyLangs; its last
release, 0.0.4.post2, is its repository's last commit): `Embedder(model_dir, batch_size=64)` and
`sents2elmo(sents, output_layer=-1)` -> a list of float32 numpy arrays in input order, (n, D) each, or
(3, n, D) for output_layer -2. And the same numbers: the tests hold them to ELMoForManyLangs' own outputs on
the model folders in testdata/. This module only translates: the folder is read by `load_elmo`
(`published.read_elmoformanylangs`, where each detail of ELMoForManyLangs' network is handled and named), the
text by the model's own dictionaries (`data.Dictionaries`), and the network is `elmo.BiLM`, the one every
format runs on. Any other model `load_elmo` reads (AllenNLP's, the NLPL repository's, ours) works here too.

Where this differs from ELMoForManyLangs, on purpose:
  1. Stateless. ELMoForManyLangs carries its LSTM state from batch to batch and from call to call, so a
     sentence's vectors depend on what was embedded before it (and so on batch_size). Here a sentence gives
     the same vectors alone, in any batch, on any call: those of ELMoForManyLangs' first call on a fresh
     model with every sentence in one batch.
  2. An empty sentence gives an empty array, (0, D) or (3, 0, D); an empty list gives []. ELMoForManyLangs
     crashes on both.
  3. Batches: sentences of similar length go together (the numbers cannot change, being stateless), and a
     frozen biLM remembers every word's character-CNN output (`elmo.TokenMemo`). Like ELMoForManyLangs, it
     runs on the GPU when torch sees one; `device="cpu"` (an argument of ours) says otherwise.
  4. A sentence that is not a list of strings, or an `output_layer` with no layer, is a ValueError naming it
     (a str given as a sentence would otherwise be read as one token per character); a model folder that
     is missing, incomplete or damaged is one line naming the file (FileNotFoundError or ValueError).
"""
from __future__ import annotations

import os

import torch

from elmo_pytorch.data import token_lists
from elmo_pytorch.elmo import load_elmo
from elmo_pytorch.tools import embed_by_length


class Embedder:
    """ELMoForManyLangs' `Embedder`: a frozen biLM read from `model_dir` that turns sentences (lists of
    tokens) into ELMo vectors."""

    def __init__(self, model_dir, batch_size: int = 64, device: str | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        self.model_dir, self.batch_size = model_dir, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bilm = load_elmo(os.fspath(model_dir), device=self.device)

    def sents2elmo(self, sents, output_layer: int = -1) -> list:
        """Sentences -> one float32 array each, in order: output_layer -1 the average of the layers (n, D),
        0 .. L one layer (n, D), -2 all of them (L+1, n, D). D = 2 x the projection (1024 for the published
        models); layer 0 is the token vector, twice."""
        n_layers = self.bilm.config.n_layers + 1
        if isinstance(output_layer, bool) or not isinstance(output_layer, int) \
                or not -2 <= output_layer < n_layers:
            raise ValueError(f"output_layer must be -1 (the average), -2 (all layers) or a layer 0-{n_layers - 1}, "
                             f"not {output_layer!r}")
        sents = token_lists(sents, "sents", "sentence")
        out = [None] * len(sents)
        for i, layers in embed_by_length(self.bilm, sents, self.batch_size):
            layers = layers.numpy()                                         # (L+1, n, D) float32
            out[i] = layers.mean(axis=0) if output_layer == -1 else layers.copy() if output_layer == -2 \
                else layers[output_layer].copy()
        return out
