"""AllenNLP's ELMo API on this project's model: code written for AllenNLP's ELMo runs here after one line.

    from allennlp.modules.elmo import Elmo, batch_to_ids   ->  from allennlp_compat import Elmo, batch_to_ids
    from allennlp.commands.elmo import ElmoEmbedder         ->  from allennlp_compat import ElmoEmbedder

The same names, signatures, argument names and defaults, return types, dictionary keys and shapes as
AllenNLP's (`allennlp/modules/elmo.py` at v2.10.1, `allennlp/commands/elmo.py` at v0.9.0, the last release
that had the embedder), and the same numbers: the tests hold both classes to AllenNLP's own outputs on its
fixture (testdata/golden.npz). This module only translates. The model is `elmo.py`, reading the published
files is `load_elmo` and `published.py`, and the HDF5 file is written by `tools.write_embeddings`, which
`python elmo.py embed` uses too. It is the one module of the project whose constructors read weight files:
that is the API it reproduces.

    elmo = Elmo(options_file, weight_file, 2, dropout=0)         # AllenNLP's torch module: 2 scalar mixes
    out = elmo(batch_to_ids([["I", "ate", "."], ["Hi"]]))
    out["elmo_representations"]   # 2 x (B, T, 2P): the mixes, without <S>/</S>; out["mask"]: (B, T) bool
    embedder = ElmoEmbedder(options_file, weight_file)           # AllenNLP 0.9's numpy embedder
    embedder.embed_sentence(["I", "ate", "."])                   # numpy float32 (L+1, 3, 2P); L+1 = 3
    embedder.embed_file(open("sentences.txt"), "vectors.hdf5")   # the `allennlp elmo` HDF5 layout

Files may be paths (str or pathlib.Path), one of this project's checkpoints as weight_file (options_file
is then not needed), or http(s) URLs, the published addresses included: a URL is downloaded once into the
cache folder (`$ELMO_DATA_CACHE/published`, default ~/.cache/elmo-pytorch/published) and reused; offline,
the error names the URL and says to pass a local copy.

Where this differs from AllenNLP, on purpose:
  1. Stateless. AllenNLP's biLM carried its LSTM state from one call into the next, so a sentence's vectors
     depended on the batch before it, and the same batch gave other numbers on a second call. Here every
     call starts from zero state: the vectors equal AllenNLP's *first* call, every time.
  2. `vocab_to_cache` needs nothing computed in advance: a frozen biLM remembers each token's character-CNN
     output the first time it meets it (`elmo.TokenMemo`), which is what the cache was for. It is accepted,
     and `word_inputs` (ids into it) give AllenNLP's numbers: as in AllenNLP, the words they name are what
     runs and the character ids are ignored, unless an id falls outside the list (both then use the
     characters).
  3. An empty sentence gives float32 zeros of shape (L+1, 0, 2P), the model's own sizes (AllenNLP 0.9
     returned float64 (3, 0, 1024) whatever the model).
  4. `ElmoEmbedder.embed_file` refuses a blank line or (with `use_sentence_keys`) a repeated sentence before
     it writes anything (AllenNLP found a repeat halfway through the file), batches sentences of similar
     length together (the same numbers, being stateless), writes `OUTPUT.partial` and renames it when
     complete, and continues an interrupted run of the same job instead of starting over.
  5. `module=` takes one of this project's biLMs (`elmo.BiLM`, as `load_elmo` returns it), not an AllenNLP
     module. `requires_grad=True` fine-tunes it with dropout off inside the biLM (AllenNLP's had none).
  6. The parameters have this project's names (`mixes.0.weights`, not `scalar_mix_0.scalar_parameters.0`):
     state dicts saved from AllenNLP models do not load into these classes.
"""
from __future__ import annotations

import hashlib
import itertools
import os

import numpy
import torch

from elmo_pytorch import elmo
from elmo_pytorch.data import batch_to_ids  # noqa: F401  (AllenNLP's name, AllenNLP's ids: re-exported as they are)
from elmo_pytorch.published import local_copy
from elmo_pytorch.runtime import UserError, log_stderr
from elmo_pytorch.tools import embed_by_length, write_embeddings

# AllenNLP 0.9's defaults: the `original` model (2x4096_512_2048cnn_2xhighway), downloaded on first use
_ORIGINAL = "https://allennlp.s3.amazonaws.com/models/elmo/2x4096_512_2048cnn_2xhighway/"
DEFAULT_OPTIONS_FILE = _ORIGINAL + "elmo_2x4096_512_2048cnn_2xhighway_options.json"
DEFAULT_WEIGHT_FILE = _ORIGINAL + "elmo_2x4096_512_2048cnn_2xhighway_weights.hdf5"
DEFAULT_BATCH_SIZE = 64


class ConfigurationError(Exception):
    """AllenNLP's error for arguments or input it refuses (allennlp.common.checks.ConfigurationError)."""


def _load_bilm(options_file, weight_file) -> tuple[elmo.BiLM, list]:
    """options + weights (paths or URLs) -> the frozen biLM, via load_elmo (the project's one loader), and
    the absolute paths of the two local files."""
    if weight_file is None:
        raise ConfigurationError("weight_file is required (or pass module=, a biLM, with both files None)")
    weights = os.path.abspath(local_copy(weight_file, log=log_stderr))
    options = os.path.abspath(local_copy(options_file, log=log_stderr)) if options_file is not None else None
    return elmo.load_elmo(weights, options=options), [options, weights]


class Elmo(elmo.Elmo):
    """AllenNLP's `Elmo` (allennlp.modules.elmo, v2.10.1): a frozen biLM read from the published files and
    `num_output_representations` trainable scalar mixes, with dropout. `forward(inputs, word_inputs=None)`
    takes character ids (..., T, 50) and returns {"elmo_representations": [(..., T, 2P)] * n, "mask":
    (..., T)}; with `keep_sentence_boundaries` the <S>/</S> positions stay (T + 2)."""

    def __init__(self, options_file, weight_file, num_output_representations: int, requires_grad: bool = False,
                 do_layer_norm: bool = False, dropout: float = 0.5, vocab_to_cache: list | None = None,
                 keep_sentence_boundaries: bool = False, scalar_mix_parameters: list | None = None,
                 module: torch.nn.Module | None = None):
        if module is not None:
            if options_file is not None or weight_file is not None:
                raise ConfigurationError("Don't provide options_file or weight_file with module")
            if not isinstance(module, elmo.BiLM):
                raise ConfigurationError("module must be one of this project's biLMs (elmo.BiLM, e.g. "
                                         "elmo.load_elmo('lm.pt')), not an AllenNLP module")
            bilm = module
        else:
            bilm, _ = _load_bilm(options_file, weight_file)
        super().__init__(bilm, num_output_representations, do_layer_norm, dropout, requires_grad)
        self.vocab_to_cache = list(vocab_to_cache) if vocab_to_cache is not None else None
        self.keep_sentence_boundaries = keep_sentence_boundaries
        if scalar_mix_parameters is not None:        # AllenNLP: these weights, fixed (trainable=False), gamma 1
            if len(scalar_mix_parameters) != bilm.config.n_layers + 1:
                raise ConfigurationError(f"Length of initial_scalar_parameters {len(scalar_mix_parameters)} "
                                         f"differs from mixture_size {bilm.config.n_layers + 1}")
            for mix in self.mixes:
                with torch.no_grad():
                    mix.weights.copy_(torch.tensor(scalar_mix_parameters, dtype=mix.weights.dtype))
                mix.requires_grad_(False)

    def get_output_dim(self) -> int:
        return self.output_dim

    def forward(self, inputs, word_inputs=None):
        shape = inputs.shape                                       # (..., T, W): AllenNLP takes any leading dims
        chars = inputs.reshape(-1, *shape[-2:])                    # (B, T, W)
        if word_inputs is not None and self.vocab_to_cache is not None:
            chars = self._words_to_chars(word_inputs.reshape(-1, word_inputs.shape[-1]), chars)
        layers, mask_bos_eos = self.layers(chars)                  # L+1 x (B, T+2, 2P), (B, T+2)
        if self.keep_sentence_boundaries:
            representations = [self.dropout(mix(layers, mask_bos_eos)) for mix in self.mixes]
            mask = mask_bos_eos
        else:
            representations, mask = self.mix(layers, mask_bos_eos), mask_bos_eos[:, 2:]
        lead = shape[:-2]
        return {"elmo_representations": [r.reshape(*lead, *r.shape[1:]) for r in representations],
                "mask": mask.reshape(*lead, mask.shape[1])}

    def _words_to_chars(self, word_ids, chars):               # (B, T) ids into vocab_to_cache -> (B, T, W)
        """AllenNLP's cached path embeds the words that `word_inputs` name (0 = padding) and ignores the
        character ids; an id outside the cached list makes it fall back to the character ids."""
        if word_ids.numel() and not 0 <= int(word_ids.min()) <= int(word_ids.max()) < len(self.vocab_to_cache):
            return chars
        words = [[self.vocab_to_cache[i] for i in row if i > 0] for row in word_ids.tolist()]
        out = torch.zeros(*word_ids.shape, chars.shape[-1], dtype=chars.dtype)
        ids = batch_to_ids(words)                                  # (B, T', W), T' <= T
        out[:, :ids.shape[1]] = ids
        return out.to(chars.device)


class ElmoEmbedder:
    """AllenNLP 0.9's `ElmoEmbedder` (allennlp.commands.elmo): a frozen biLM that turns token lists into
    numpy float32 arrays (L+1, n, 2P), one per sentence (L+1 = 3: the character CNN and the two LSTM
    layers), and text files into `allennlp elmo` HDF5 files. `cuda_device` >= 0 runs it on that GPU."""

    def __init__(self, options_file=DEFAULT_OPTIONS_FILE, weight_file=DEFAULT_WEIGHT_FILE, cuda_device: int = -1):
        device = torch.device("cpu")
        if cuda_device >= 0:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if cuda_device >= have:
                raise UserError(f"cuda_device={cuda_device}: this machine has {have or 'no'} CUDA GPU"
                                f"{'s' if have != 1 else ''}; pass cuda_device=-1 to run on the CPU")
            device = torch.device("cuda", cuda_device)
        self.elmo_bilm, self.files = _load_bilm(options_file, weight_file)   # files: embed_file's job names them
        self.elmo_bilm.to(device)
        self.cuda_device = cuda_device

    def batch_to_embeddings(self, batch: list) -> tuple:
        """Token lists -> (activations (B, L+1, T, 2P), mask (B, T)) torch tensors, <S>/</S> removed."""
        ids = self.elmo_bilm.lexicon.ids(batch).to(next(self.elmo_bilm.parameters()).device)
        with torch.no_grad():
            out = self.elmo_bilm(ids)
        return torch.stack(out["activations"], dim=1), out["mask"]

    def embed_sentence(self, sentence: list) -> numpy.ndarray:
        """One token list -> (L+1, n, 2P) float32."""
        return self.embed_batch([sentence])[0]

    def embed_batch(self, batch: list) -> list:
        """Token lists -> one (L+1, n, 2P) float32 array each, in order; an empty sentence gives n = 0.
        The whole batch goes through the biLM at once (`tools.embed_by_length`, which leaves empty ones out)."""
        arrays = dict(embed_by_length(self.elmo_bilm, batch, max(len(batch), 1)))
        return [arrays[i].numpy() for i in range(len(batch))]

    def embed_sentences(self, sentences, batch_size: int = DEFAULT_BATCH_SIZE):
        """Lazily, in order: takes `batch_size` sentences from the iterable, yields their arrays, then reads on."""
        sentences = iter(sentences)
        while batch := list(itertools.islice(sentences, batch_size)):
            yield from self.embed_batch(batch)

    def embed_file(self, input_file, output_file_path, output_format: str = "all",
                   batch_size: int = DEFAULT_BATCH_SIZE, forget_sentences: bool = False,
                   use_sentence_keys: bool = False) -> None:
        """A text file (an open file, as AllenNLP took, or a path), one whitespace-tokenised sentence a line
        -> HDF5 `output_file_path`: dataset "i" (or the sentence itself, with `use_sentence_keys`) holds line
        i's vectors, (L+1, n, 2P) for "all", (n, 2P) for "top" and "average"; "sentence_to_index" maps each
        sentence to its index unless `forget_sentences` or `use_sentence_keys`."""
        if output_format not in ("all", "top", "average"):
            raise ConfigurationError(f"output_format must be 'all', 'top' or 'average', not {output_format!r}")
        if isinstance(input_file, (str, os.PathLike)):
            with open(input_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        else:
            lines = [line.strip() for line in input_file]
            input_file.close()                                     # as AllenNLP did
        blank = [i for i, line in enumerate(lines) if line == ""]
        if blank:
            raise ConfigurationError(f"Your input file contains empty lines at indexes {blank}. Please remove them.")
        keys = [str(i) for i in range(len(lines))]
        if use_sentence_keys:
            first = {}
            for i, line in enumerate(lines):
                if line in first:
                    raise ConfigurationError(f"Key already exists: line {i} repeats line {first[line]} "
                                             f"({line[:40]!r}). To encode duplicate sentences, do not pass "
                                             f"use_sentence_keys; nothing was written to {output_file_path}")
                if line == "." or line.startswith("/"):             # HDF5 reads these as the root group
                    raise ConfigurationError(f"line {i} ({line!r}) cannot name an HDF5 dataset: do not pass "
                                             f"use_sentence_keys; nothing was written to {output_file_path}")
                first[line] = i
            keys = lines
        index = None if forget_sentences or use_sentence_keys else {line: str(i) for i, line in enumerate(lines)}
        job = {"input": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "elmo": self.files,
               "layers": output_format, "sentence_keys": use_sentence_keys}
        write_embeddings(self.elmo_bilm, [line.split() for line in lines], os.fspath(output_file_path),
                         output_format, batch_size, keys, index, job, log_stderr)
