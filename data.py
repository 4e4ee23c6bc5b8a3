"""Data for ELMo: tokenisation, vocabularies, character ids, corpus loading and length-bucketed batches.

Every script reads text through this module, so a corpus is tokenised, validated and batched the same way
for pretraining and for the downstream tasks.

    from elmo_pytorch.data import batch_to_ids
    ids = batch_to_ids([["Hello", "world", "!"], ["Hi"]])    # (2, 3, 50) LongTensor, 0 = padding

Character ids (exactly AllenNLP's `ELMoCharacterMapper`): a token is its UTF-8 bytes cut to 48, wrapped in
begin-of-word (258) / end-of-word (259) marks and padded with 260 to 50 positions; every id is then shifted
by +1 so that 0 can mean "no token here". The sentence boundaries <S> / </S> are the one-"character" words
256 / 257; a literal "<S>" or "</S>" in the text maps to them too (AllenNLP does the same).

Local files and hub data sets take one path (`token_shard`): both become an Arrow data set of raw lines
(`datasets`), which is tokenised in parallel and written once, to disk, as a token shard: one flat int32
stream of token-type ids (4 bytes a token) and the corpus's word list. Training memory-maps the stream
(`Corpus.open_shard`), so memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import torch

from elmo_pytorch.runtime import MissingFile, UserError, disk_full, is_disk_full  # scripts import UserError from here

MAX_CHARS = 50                      # W: characters per token, word marks included (as the original)
PAD_ID = 0                          # padding token: char id 0 and word id 0
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260   # before the +1 shift
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<S>", "</S>", "<unk>", "<pad>"
SPECIALS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]   # ids 0-3 of every LM vocabulary


# ---------------------------------------------------------------------------------------------------------
# Character ids
# ---------------------------------------------------------------------------------------------------------
def _marked(chars: list[int]) -> list[int]:
    ids = [PAD_CHAR] * MAX_CHARS
    ids[0] = BOW_CHAR
    ids[1:len(chars) + 1] = chars
    ids[len(chars) + 1] = EOW_CHAR
    return [i + 1 for i in ids]     # +1: 0 is reserved for "no token"


BOS_CHAR_IDS, EOS_CHAR_IDS = _marked([BOS_CHAR]), _marked([EOS_CHAR])


def word_to_char_ids(word: str) -> list[int]:
    """One token -> MAX_CHARS character ids. Tokens longer than 48 bytes are cut, as in the original
    (which can cut a multi-byte character in half: we keep that, to stay bit-compatible)."""
    if word == BOS_TOKEN:
        return BOS_CHAR_IDS
    if word == EOS_TOKEN:
        return EOS_CHAR_IDS
    return _marked(list(word.encode("utf-8", "ignore")[: MAX_CHARS - 2]))


def batch_to_ids(sentences: list[list[str]]) -> torch.Tensor:
    """Sentences (lists of tokens) -> (B, T, W) LongTensor of character ids, T = longest sentence, 0-padded."""
    T = max((len(s) for s in sentences), default=0)
    ids = torch.zeros(len(sentences), T, MAX_CHARS, dtype=torch.long)
    for b, sentence in enumerate(sentences):
        if sentence:
            ids[b, : len(sentence)] = torch.tensor([word_to_char_ids(w) for w in sentence])
    return ids


def token_lists(items, name: str, item: str) -> list:
    """What a Python caller passed as sentences -> a list of lists of str tokens, or a ValueError naming what
    is not one: `name`, the whole (a str there, or in place of a sentence, would be read one character a
    token), `item` i, a sentence that is not a list or tuple, or a token that is not a str."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ValueError(f"{name} must be a list of {item}s, each a list of tokens, not {type(items).__name__}")
    items = list(items)
    for i, tokens in enumerate(items):
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
            raise ValueError(f"{item} {i} is a {type(tokens).__name__}, not a list of tokens (split it first)")
        bad = next((j for j, token in enumerate(tokens) if not isinstance(token, str)), None)
        if bad is not None:
            raise ValueError(f"{item} {i}, token {bad} is a {type(tokens[bad]).__name__}, not a str")
    return [list(tokens) for tokens in items]


def boundary_char_ids(device=None):
    """The character ids of <S> and </S>: two (W,) tensors."""
    return (torch.tensor(BOS_CHAR_IDS, device=device), torch.tensor(EOS_CHAR_IDS, device=device))


# ---------------------------------------------------------------------------------------------------------
# Lexicons: how a biLM reads text. Each biLM has one (`BiLM.lexicon`, chosen by its config): text -> its ids,
# the ids of its <S> and </S>, and its padding character.
# ---------------------------------------------------------------------------------------------------------
class Utf8Chars:
    """AllenNLP's and bilm-tf's: a token is its UTF-8 bytes (`batch_to_ids`); every character CNN trained
    here, and every AllenNLP and NLPL model, reads this."""
    pad_char = PAD_CHAR + 1

    def ids(self, sentences):                                   # -> (B, T, W)
        return batch_to_ids(sentences)

    def boundaries(self, device=None):
        return boundary_char_ids(device)


class LmWords:
    """A biLM with word embeddings over its LM vocabulary (train_lm.py --token-encoder word): ids are
    vocabulary rows (`Corpus`), SPECIALS first, so <S> and </S> are 1 and 2."""

    def ids(self, sentences):
        raise UserError("this biLM embeds the words of its LM vocabulary (--token-encoder word): ELMo features "
                        "come from character biLMs; train one with the default --token-encoder char")

    def boundaries(self, device=None):
        return torch.tensor(1, device=device), torch.tensor(2, device=device)


class Dictionaries:
    """A model's own character and word dictionaries (ELMoForManyLangs' char.dic and word.dic; the config's
    `chars` and `words`, token -> id; either may be None) instead of UTF-8 bytes. As ELMoForManyLangs reads
    text: a token is cut to MAX_CHARS - 2 *characters* (not bytes), and the cut token is what both
    dictionaries look up; what they lack is <oov>; the tokens <bos> and <eos> are the sentence boundaries.
    Every id is shifted by +1, so that 0 still means "no token here". The ids of a token: with both
    dictionaries (1 + W,), its word id first, then <bow>, its characters, <eow> and <pad> to W; characters
    only (W,); words only, one id."""
    memo_tokens = 1_000_000       # the memo's bound: a corpus of ever new words empties it instead of growing it

    def __init__(self, chars: dict | None, words: dict | None):
        self.chars, self.words = chars, words
        self.pad_char = chars["<pad>"] + 1 if chars else None
        self.memo = {}                                          # token -> its ids: text repeats its words

    def token(self, token: str) -> list | int:
        if token in self.memo:
            return self.memo[token]
        cut = token[: MAX_CHARS - 2]
        ids = []
        if self.words is not None:
            ids.append(self.words.get(cut, self.words["<oov>"]) + 1)
        if self.chars is not None:
            c = self.chars
            inner = [c[cut]] if cut in ("<bos>", "<eos>") else [c.get(ch, c["<oov>"]) for ch in cut]
            chars = [c["<bow>"]] + inner + [c["<eow>"]]
            ids += [i + 1 for i in chars + [c["<pad>"]] * (MAX_CHARS - len(chars))]
        if len(self.memo) >= self.memo_tokens:
            self.memo.clear()
        self.memo[token] = ids if self.chars is not None else ids[0]
        return self.memo[token]

    def ids(self, sentences):                                   # -> (B, T, 1 + W), (B, T, W) or (B, T)
        T = max((len(s) for s in sentences), default=0)
        row = () if self.chars is None else (MAX_CHARS + (self.words is not None),)
        ids = torch.zeros(len(sentences), T, *row, dtype=torch.long)
        for b, sentence in enumerate(sentences):
            if sentence:
                ids[b, : len(sentence)] = torch.tensor([self.token(t) for t in sentence])
        return ids

    def boundaries(self, device=None):
        return torch.tensor(self.token("<bos>"), device=device), torch.tensor(self.token("<eos>"), device=device)


def lexicon(config):
    """The lexicon a biLM's config names: its own dictionaries where it has them, else UTF-8 characters
    (a character CNN) or its LM vocabulary (word embeddings)."""
    if config.chars is not None or config.words is not None:
        return Dictionaries(config.chars, config.words)
    return Utf8Chars() if config.token_encoder == "char" else LmWords()


# ---------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------
# For raw text: words (with inner apostrophes/hyphens/periods as in "don't", "state-of-the-art", "e.g."),
# numbers ("3.5", "1,234"), already split clitics ("n't", "'s"), PTB brackets ("-lrb-"), "...", "--", "``",
# "''" whole, and every other non-space character alone.
_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-'.]\w+)*"                 # numbers, words
                       r"|(?i:n't|'(?:s|re|ve|ll|d|m))\b|(?i:-[lr][rcs]b-)"   # clitics, brackets
                       r"|\.\.\.|--|``|''|\S", re.UNICODE)
# Penn Treebank clitics: "doesn't" -> "does n't", "can't" -> "ca n't", "it's" -> "it 's", "we'll" -> "we 'll".
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
TOKENIZERS = ("whitespace", "regex", "ptb")


def tokenize(line: str, mode: str = "whitespace") -> list[str]:
    """'whitespace' for corpora that are already tokenised (PTB keeps `<unk>` and `N` whole); 'regex' for
    raw text (WikiText raw); 'ptb' = regex, then Penn Treebank clitic splitting.

    The biLM and the task must cut words the same way. SST is PTB-tokenised ("does n't", "it 's"), and a
    biLM that only ever saw "doesn't" meets "n't" (the negation sentiment hinges on) as a stranger. So
    pretrain with --tokenizer ptb for SST and MultiNLI; the movie-review corpus keeps "doesn't" whole."""
    if mode == "whitespace":
        return line.split()
    tokens = _TOKEN_RE.findall(line)
    if mode == "ptb":
        tokens = [piece for token in tokens for piece in _split_clitic(token)]
        quotes = itertools.count()                   # PTB quotes: "a" -> `` a ''
        tokens = [("``", "''")[next(quotes) % 2] if token == '"' else token for token in tokens]
    return tokens


def _split_clitic(token: str) -> tuple[str, ...]:
    match = _CLITIC_RE.match(token)
    return match.groups() if match else (token,)


def split_long(tokens: list[str], max_length: int) -> list[list[str]]:
    """Sentences longer than max_length tokens are split into max_length pieces (the LSTM cost and memory
    grow with the longest sentence of a batch; a 5,000-token "line" is usually a file without newlines)."""
    if max_length <= 0 or len(tokens) <= max_length:
        return [tokens]
    return [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)]


# ---------------------------------------------------------------------------------------------------------
# Reading text: local files (validated, with line numbers in every error) or hub data sets
# ---------------------------------------------------------------------------------------------------------
def check_file(path: str, what: str = "file") -> str:
    if not os.path.exists(path):
        raise MissingFile(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory, expected a file: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} is empty (0 bytes): {path}")
    return path


def read_lines(path: str, encoding: str = "utf-8", skip_bad_lines: bool = False, stats: dict | None = None):
    """Yield (line_number, text) for the lines of a text file, without the newline.

    A binary file (NUL bytes) is an error. A line that does not decode is an error naming the line, or,
    with skip_bad_lines, skipped and counted in stats["skipped"]."""
    check_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise UserError(f"{path}:{number}: binary data (NUL byte): this is not a text file")
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                if skip_bad_lines:
                    if stats is not None:
                        stats["skipped"] = stats.get("skipped", 0) + 1
                    continue
                raise UserError(f"{path}:{number}: not valid {encoding} ({e.reason} at byte {e.start}); "
                                f"pass --encoding ENC, or --skip-bad-lines to skip such lines") from None
            except LookupError:
                raise UserError(f"unknown --encoding {encoding!r}") from None
            yield number, text.rstrip("\r\n")


def import_datasets():
    """`datasets` (Arrow), imported when a corpus is read (the rest of the project never pays its import
    time); missing, it is one line saying how to get it: pip's `elmo-pytorch[train]` extra brings it."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a corpus needs the `datasets` package: pip install datasets "
                        "(or pip install 'elmo-pytorch[train]')") from None
    return datasets


def hub_dataset(name: str, config: str | None, split: str, local_flags: str):
    """A Hugging Face hub data set split (Arrow, memory-mapped: larger than RAM is fine). Fails fast, in one
    line naming the local-file flags, when the hub cannot be reached or the data set cannot be loaded."""
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {name} (offline?); use local files: "
                        f"{local_flags}")
    datasets = import_datasets()
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # unknown name, split or config, interrupted download: many exception types
        raise UserError(f"could not load {name} {config or ''} split {split!r} from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); "
                        f"or use local files: {local_flags}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if huggingface.co answers within `timeout` seconds (and HF_HUB_OFFLINE is not set). Checked
    before `datasets.load_dataset`, whose own retries take minutes to give up when there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and corpora: one stream of token-type ids, in memory or memory-mapped from a token shard
# ---------------------------------------------------------------------------------------------------------
def word_list(counts: dict[str, int]) -> list[str]:
    """SPECIALS, then every other word by falling frequency (ties: first seen, the order `counts` keeps).
    An LM vocabulary of size V is this list's first V words, so one list serves every --vocab-size. A
    literal `<unk>` in the text (PTB) is the same `<unk>`."""
    return SPECIALS + sorted((w for w in counts if w not in SPECIALS), key=lambda w: -counts[w])


def word_counts(sentences: list[list[str]]) -> dict[str, int]:
    """How often each token occurs, in first-seen order (SPECIALS first, counted only if in the text)."""
    counts: dict[str, int] = dict.fromkeys(SPECIALS, 0)
    for sentence in sentences:
        for w in sentence:
            counts[w] = counts.get(w, 0) + 1
    return counts


def build_vocab(sentences: list[list[str]], max_size: int) -> list[str]:
    """The LM softmax vocabulary: SPECIALS, then the most frequent tokens, at most max_size words in all."""
    return word_list(word_counts(sentences))[: max(len(SPECIALS), max_size)]


def char_table(words: list[str]) -> torch.Tensor:
    """Every word's character ids at once: (n_words, W) int16, row i == word_to_char_ids(words[i]).
    Vectorised (one byte string, one scatter), because a 1B-word corpus has ~800k distinct words."""
    encoded = [w.encode("utf-8", "ignore")[: MAX_CHARS - 2] for w in words]
    n = torch.tensor([len(b) for b in encoded], dtype=torch.long)                  # (n_words,)
    table = torch.full((len(words), MAX_CHARS), PAD_CHAR, dtype=torch.int16)
    table[:, 0] = BOW_CHAR
    if int(n.sum()):
        flat = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8).to(torch.int16)
        rows = torch.repeat_interleave(torch.arange(len(words)), n)                # the word of each byte
        cols = torch.arange(len(flat)) - torch.repeat_interleave(n.cumsum(0) - n, n) + 1
        table[rows, cols] = flat
    table[torch.arange(len(words)), n + 1] = EOW_CHAR
    table += 1                                                                      # 0 = "no token"
    for i, w in enumerate(words):
        if w in (BOS_TOKEN, EOS_TOKEN):                                             # one-"character" words
            table[i] = torch.tensor(word_to_char_ids(w), dtype=torch.int16)
    return table


class Corpus:
    """A tokenised corpus as one stream of token-type ids: every sentence as <S> w_1 .. w_n </S>, one after
    the other. The stream serves both training contexts: `batch` cuts it back into whole sentences
    (--context sentence), `window` reads fixed windows of it (--context stream).

    `types` is the corpus's own word list (SPECIALS first, so type 1 is <S> and type 2 is </S>) and covers
    every word of the corpus: the character CNN sees every word's spelling (`type_chars`), and only the
    softmax target of a word outside the LM vocabulary becomes <unk> (`type_vocab`). The stream is int32
    (4 bytes a token), in memory (`from_sentences`) or memory-mapped from a token shard (`open_shard`), so
    reading a window touches only that window's pages."""

    def __init__(self, stream: torch.Tensor, lengths: torch.Tensor, types: list[str], counts: list[int],
                 vocab: list[str]):
        self.stream = stream                                                    # (N,) int32 type ids
        self.lengths = lengths.long()                                           # (S,) words per sentence
        self.offsets = torch.cumsum(self.lengths + 2, 0) - (self.lengths + 2)   # (S,) where each <S> is
        self.types = types                                                      # type id -> string
        self.vocab = vocab                                                      # LM vocabulary id -> string
        stoi = {w: i for i, w in enumerate(vocab)}
        unk = stoi[UNK_TOKEN]
        # per type: its character ids (for the CNN) and its LM-vocabulary id (the softmax target)
        self.type_chars = char_table(types)                                     # (types, W) int16
        self.type_vocab = torch.tensor([stoi.get(w, unk) for w in types], dtype=torch.long)
        self.n_unk = sum(c for c, v in zip(counts, self.type_vocab.tolist()) if v == unk)   # no pass over N

    @classmethod
    def from_sentences(cls, sentences: list[list[str]], vocab: list[str]) -> "Corpus":
        """Token lists -> an in-memory corpus (tests, small files)."""
        counts = word_counts(sentences)
        types = word_list(counts)
        index = {w: i for i, w in enumerate(types)}
        bos, eos = index[BOS_TOKEN], index[EOS_TOKEN]
        stream = [i for s in sentences for i in (bos, *(index[w] for w in s), eos)]
        return cls(torch.tensor(stream, dtype=torch.int32), torch.tensor([len(s) for s in sentences]),
                   types, [counts[w] for w in types], vocab)

    @classmethod
    def open_shard(cls, path: str, vocab: list[str] | None = None, vocab_size: int = 0) -> "Corpus":
        """A token shard folder (see `token_shard`) -> a corpus whose stream is memory-mapped, not read.
        vocab=None: the LM vocabulary is the shard's own `vocab_size` most frequent words (training data),
        kept as `corpus.vocab`."""
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        types, counts = shard_words(path)
        if vocab is None:
            vocab = types[: max(len(SPECIALS), vocab_size)]
        stream = torch.from_file(os.path.join(path, "tokens.i32"), shared=False, size=meta["stream_length"],
                                 dtype=torch.int32)
        lengths = torch.from_file(os.path.join(path, "lengths.i32"), shared=False, size=meta["sentences"],
                                  dtype=torch.int32)
        return cls(stream, lengths, types, counts, vocab)

    def __len__(self):
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def _inputs(self, types, char_inputs: bool):
        """Type ids (-1 = no token) -> char ids (..., W) or LM-vocabulary ids (...), 0 where no token."""
        real, safe = types >= 0, types.clamp(min=0)
        if char_inputs:
            return torch.where(real.unsqueeze(-1), self.type_chars[safe].long(), PAD_ID)
        return torch.where(real, self.type_vocab[safe], PAD_ID)

    def batch(self, indices: list[int], char_inputs: bool):
        """Sentences `indices` -> model inputs (B, T, W) char ids or (B, T) vocab ids, and LM targets
        (B, T+2) = vocab ids of <S> w_1 .. w_n </S>, PAD_ID after."""
        lengths = self.lengths[indices]                                          # (B,)
        B, T = len(indices), int(lengths.max())
        steps = torch.arange(T).unsqueeze(0)                                     # (1, T)
        positions = self.offsets[indices].unsqueeze(1) + 1 + steps               # (B, T): after each <S>
        real = steps < lengths.unsqueeze(1)
        types = torch.where(real, self.stream[positions.clamp(max=len(self.stream) - 1)].long(), -1)
        targets = torch.zeros(B, T + 2, dtype=torch.long)
        targets[:, 1:-1] = self._inputs(types, char_inputs=False)
        targets[:, 0] = SPECIALS.index(BOS_TOKEN)
        targets[torch.arange(B), lengths + 1] = SPECIALS.index(EOS_TOKEN)
        return self._inputs(types, char_inputs), targets

    def window(self, starts: torch.Tensor, length: int, char_inputs: bool, backward: bool = False):
        """One window of the token stream per row: row b reads `length` tokens from position starts[b] on,
        and each token's target is the next one in reading order. backward=True reads the stream from its
        end (position r of the reversed stream is N-1-r of the stream): the backward LM is a forward LM of
        the reversed text, so its carried state holds what *follows* a word, its true history.
        Returns inputs (B, length, W) or (B, length), and targets (B, length), PAD_ID (not scored) past
        the stream's ends and where the target only restarts a sentence: a forward `</S>` is always
        followed by `<S>` (a backward `<S>` by `</S>`), so there is nothing to learn there, and the count
        of predictions stays n + 1 per sentence and direction, as in sentence mode."""
        N = len(self.stream)
        positions = starts.long().unsqueeze(1) + torch.arange(length + 1)          # (B, length + 1)
        if backward:
            positions = N - 1 - positions
        real = (positions >= 0) & (positions < N)
        types = torch.where(real, self.stream[positions.clamp(0, N - 1)].long(), -1)
        x, y = types[:, :-1], types[:, 1:]                                          # (B, length) each
        restart = SPECIALS.index(EOS_TOKEN if backward else BOS_TOKEN)
        targets = torch.where(y == restart, PAD_ID, self._inputs(y, char_inputs=False))
        return self._inputs(x, char_inputs), targets


def bucket_batches(lengths: torch.Tensor, batch_tokens: int, seed: int, shuffle: bool = True,
                   max_sentences: int = 0):
    """Length-bucketed batches under a token budget: sentences of similar length go together (little
    padding), each batch holds at most `batch_tokens` padded tokens (B * longest), and the batch order is
    shuffled; `max_sentences` (0 = none) also caps the sentences per batch. Deterministic in `seed` (we pass
    seed + epoch), which is what lets --resume skip to the exact batch where a run stopped. Returns a list
    of index lists."""
    rng = random.Random(seed)
    lengths = lengths.tolist()
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)                              # random order among equal lengths
    order.sort(key=lengths.__getitem__)           # stable: shuffled within each length
    batches, current, longest = [], [], 0
    for i in order:
        n = lengths[i]
        full = max(longest, n) * (len(current) + 1) > batch_tokens or len(current) == max_sentences
        if current and full:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------------------
# Token shards: a corpus tokenised once into a memory-mapped file, reused by later runs and by --resume
# ---------------------------------------------------------------------------------------------------------
SHARD_FORMAT = "elmo-shard/1"   # bump when the files' layout changes: old shards are then rebuilt


def default_cache_dir() -> str:
    """--data-cache default: $ELMO_DATA_CACHE, else $XDG_CACHE_HOME/elmo-pytorch, else ~/.cache/elmo-pytorch."""
    if os.environ.get("ELMO_DATA_CACHE"):
        return os.environ["ELMO_DATA_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "elmo-pytorch")


def token_shard(source: dict, cache_dir: str, tokenizer: str, max_length: int, encoding: str = "utf-8",
                skip_bad_lines: bool = False, workers: int = 0, log=print) -> str:
    """The folder holding `source`'s token shard, built on first use. source: {"files": [paths]} or
    {"dataset": name, "config": config, "split": split, "local_flags": "..."} (a hub data set).

    The folder is named by the inputs (local files: path, size and modification time, so an edited file
    gets a new shard), the tokenizer and --max-length. Not by the vocabulary size: the shard keeps the
    corpus's whole frequency-sorted word list, and a vocabulary of size V is its first V words. Files:
      tokens.i32   the stream, every sentence as <S> w_1 .. w_n </S>, int32 ids into words.tsv
      lengths.i32  words per sentence (for --context sentence)
      words.tsv    word<TAB>count, SPECIALS first, then by falling frequency
      meta.json    what was built from what; written last, so a folder without it is not a shard
    Built in a temporary folder and renamed into place: an interrupted build leaves no half shard, and the
    temporary folder of a build that was killed (kill -9, a lost machine) is removed by the next build in the
    same cache, once no process holds its lock. A full disk stops the build with one line (exit status 4)
    saying how much room it needs."""
    if "files" in source:
        files = [os.path.abspath(check_file(p)) for p in source["files"]]
        described = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
        label = os.path.basename(files[0]) + (f"+{len(files) - 1}" if len(files) > 1 else "")
        source = {**source, "files": files}
    else:
        described = [source["dataset"], source["config"], source["split"]]
        label = f"{source['dataset'].replace('/', '_')}-{source['split']}"
    key = {"format": SHARD_FORMAT, "source": described, "tokenizer": tokenizer, "max_length": max_length,
           "encoding": encoding, "skip_bad_lines": skip_bad_lines}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{label}.{tokenizer}.{digest}")
    if os.path.exists(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        log(f"token shard {path}: reused ({meta['words']:,} words, {meta['sentences']:,} sentences)")
        return path
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the --data-cache folder {cache_dir}: {e.strerror}") from None
    remove_abandoned_builds(cache_dir, log)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=cache_dir)
    lock = _hold_lock(tmp)        # while this process lives, no other build takes the folder for a leftover
    try:
        _build_shard(source, tmp, key, digest, workers, log)
        try:
            os.rename(tmp, path)
        except OSError:           # another process built the same shard meanwhile: keep theirs
            if not os.path.exists(os.path.join(path, "meta.json")):
                raise
        log(f"token shard {path}: written")
    except Exception as e:        # noqa: BLE001  (datasets wraps the OSError of a full disk in its own errors)
        if any(is_disk_full(x) for x in (e, e.__cause__, e.__context__)):
            text = sum(os.path.getsize(p) for p in source["files"]) if "files" in source else 0
            raise disk_full(f"the token shard {path}", "the half-built shard was removed (building takes "
                            "about three times the text's size)", needed=3 * text) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            lock.close()
    return path


def _hold_lock(folder: str):
    """An exclusive lock on `folder`/.lock, held as long as the returned file is open (the OS drops it when
    the process ends, however it ends). None where the OS has no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(folder, ".lock"), "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def remove_abandoned_builds(cache_dir: str, log):
    """Remove the temporary folders (NAME.XXXX.tmp) of shard builds that were killed: those whose .lock no
    live process holds. A folder without a .lock (killed in the instant between creating it and locking it)
    is removed once it is an hour old. Never reused: a new build starts clean."""
    try:
        import fcntl
    except ImportError:
        return
    for name in os.listdir(cache_dir):
        folder = os.path.join(cache_dir, name)
        if not (name.endswith(".tmp") and os.path.isdir(folder)):
            continue
        try:
            with open(os.path.join(folder, ".lock")) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)     # fails while its builder lives
        except FileNotFoundError:
            if time.time() - os.path.getmtime(folder) < 3600:
                continue
        except OSError:
            continue
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        shutil.rmtree(folder, ignore_errors=True)
        log(f"removed {folder}: the leftovers of an interrupted shard build ({size / 2 ** 20:,.1f} MiB)")


def shard_words(path: str) -> tuple[list[str], list[int]]:
    """A token shard's word list and counts (words.tsv): SPECIALS first, then by falling frequency."""
    words, counts = [], []
    with open(os.path.join(path, "words.tsv"), encoding="utf-8") as f:
        for line in f.read().split("\n")[:-1]:
            word, count = line.rsplit("\t", 1)
            words.append(word)
            counts.append(int(count))
    return words, counts


def _build_shard(source: dict, out: str, key: dict, digest: str, workers: int, log):
    """Text -> Arrow (datasets) -> tokenised in parallel (`map(batched=True, num_proc)`) -> words counted
    -> ids written to tokens.i32. Every pass streams over Arrow record batches: memory stays flat in the
    corpus size (the word counts grow with the number of distinct words only)."""
    datasets = import_datasets()
    import pyarrow as pa
    import pyarrow.compute as pc
    datasets.disable_progress_bars()     # our own progress lines; bars would break one-line error output
    datasets.utils.logging.set_verbosity_error()
    t0, stats = time.time(), {"skipped": 0}
    arrow = os.path.join(out, "arrow")
    if "files" in source:
        total = sum(os.path.getsize(p) for p in source["files"])
        try:
            text = datasets.Dataset.from_generator(
                _text_lines, cache_dir=arrow, fingerprint=digest,
                features=datasets.Features({"text": datasets.Value("string")}),
                gen_kwargs={"paths": source["files"], "encoding": key["encoding"],
                            "skip_bad_lines": key["skip_bad_lines"], "stats": stats, "total": total, "log": log})
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, UserError):
                raise e.__cause__ from None
            raise
        log(f"  read {len(text):,} lines in {time.time() - t0:.1f}s")
    else:
        text = hub_dataset(source["dataset"], source["config"], source["split"], source["local_flags"])
        if "text" not in text.column_names:
            raise UserError(f"{source['dataset']} has no 'text' column (found {text.column_names[:5]}); "
                            f"use local files: {source['local_flags']}")
    # 1) tokenise in `workers` processes: one row a sentence (long lines split, blank lines dropped)
    num_proc = max(1, min(workers or os.cpu_count() or 1, len(text) // 20_000))  # >= 20k lines a process
    log(f"  tokenising {len(text):,} lines ({key['tokenizer']}) in {num_proc} process{'es' * (num_proc > 1)}")
    t = time.time()
    if sys.stderr.isatty():              # a person watching: datasets' own bar (lines/s, ETA) for this pass
        datasets.enable_progress_bars()
    tokens = text.map(_tokenize_batch, batched=True, batch_size=2000, num_proc=num_proc,
                      remove_columns=text.column_names, cache_file_name=os.path.join(arrow, "tokens.arrow"),
                      fn_kwargs={"tokenizer": key["tokenizer"], "max_length": key["max_length"]},
                      desc="tokenising")
    datasets.disable_progress_bars()
    log(f"  tokenised in {time.time() - t:.1f}s: {len(text) / max(time.time() - t, 1e-9):,.0f} lines/s")
    if stats["skipped"]:
        log(f"skipped {stats['skipped']:,} undecodable lines (--skip-bad-lines)")
    if len(tokens) == 0:
        where = ", ".join(source["files"]) if "files" in source else f"{source['dataset']} {source['split']}"
        raise UserError(f"no usable text in {where} (empty, or only blank lines)")
    n_split = pc.sum(tokens.data.column("split")).as_py() or 0
    if n_split:
        log(f"split {n_split:,} sentences longer than --max-length {key['max_length']} tokens")
    # 2) count the words (Arrow's hash counts list words first seen first) -> the frequency-sorted word list
    counts: dict[str, int] = dict.fromkeys(SPECIALS, 0)
    for batch in _progress(tokens, "counting words", log):
        found = pc.value_counts(pc.list_flatten(batch.column("tokens")))
        for word, count in zip(found.field(0).to_pylist(), found.field(1).to_pylist()):
            counts[word] = counts.get(word, 0) + count
    counts[BOS_TOKEN] += len(tokens)
    counts[EOS_TOKEN] += len(tokens)
    words = word_list(counts)
    # 3) write the stream, <S> ids </S> a sentence, one record batch at a time
    lookup, n_stream = pa.array(words), 0
    with open(os.path.join(out, "tokens.i32"), "wb") as f_tokens, \
            open(os.path.join(out, "lengths.i32"), "wb") as f_lengths:
        for batch in _progress(tokens, "writing ids", log):
            column = batch.column("tokens")
            lengths = torch.tensor(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=torch.long)
            ids = pc.index_in(pc.list_flatten(column), value_set=lookup).to_numpy(zero_copy_only=False)
            starts = torch.cumsum(lengths + 2, 0) - (lengths + 2)     # sentence s: [start, start + n + 2)
            stream = torch.empty(int((lengths + 2).sum()), dtype=torch.int32)
            is_word = torch.ones(len(stream), dtype=torch.bool)
            is_word[starts] = is_word[starts + lengths + 1] = False
            stream[is_word] = torch.tensor(ids, dtype=torch.int32)
            stream[starts] = SPECIALS.index(BOS_TOKEN)
            stream[starts + lengths + 1] = SPECIALS.index(EOS_TOKEN)
            f_tokens.write(stream.numpy().tobytes())
            f_lengths.write(lengths.to(torch.int32).numpy().tobytes())
            n_stream += len(stream)
    with open(os.path.join(out, "words.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{w}\t{counts[w]}\n" for w in words)
    del text, tokens
    shutil.rmtree(arrow, ignore_errors=True)     # the intermediate Arrow files are not needed any more
    meta = {**key, "sentences": int(counts[BOS_TOKEN]), "words": n_stream - 2 * int(counts[BOS_TOKEN]),
            "stream_length": n_stream, "distinct_words": len(words) - len(SPECIALS),
            "skipped_lines": stats["skipped"], "split_sentences": n_split,
            "build_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"token shard: {meta['words']:,} words in {meta['sentences']:,} sentences, {meta['distinct_words']:,} "
        f"distinct, {n_stream * 4 / 2 ** 20:,.1f} MiB, built in {meta['build_seconds']:.1f}s")


def _text_lines(paths, encoding, skip_bad_lines, stats, total, log):
    """datasets.Dataset.from_generator's source for local files: our validated reader (binary files,
    undecodable lines, with their line numbers), and a progress line every 5 seconds."""
    done, t0, last = 0, time.time(), time.time()
    for path in paths:
        for _, line in read_lines(path, encoding, skip_bad_lines, stats):
            done += len(line) + 1
            yield {"text": line}
            if time.time() - last > 5:
                last, rate = time.time(), done / (time.time() - t0)
                log(f"  reading text: {100 * done / max(total, 1):.0f}% | {rate / 2 ** 20:.1f} MB/s | "
                    f"ETA {(total - done) / max(rate, 1):.0f}s")


def _tokenize_batch(batch, tokenizer, max_length):
    """A batch of raw lines -> one row per sentence: its tokens, and split=1 on the first piece of a line
    longer than max_length (so that the build can say how many were split)."""
    out = {"tokens": [], "split": []}
    for line in batch["text"]:
        pieces = split_long(tokenize(line or "", tokenizer), max_length)
        for k, piece in enumerate(pieces):
            if piece:
                out["tokens"].append(piece)
                out["split"].append(int(k == 0 and len(pieces) > 1))
    return out


def _progress(dataset, what: str, log, rows: int = 100_000):
    """Iterate a datasets.Dataset as Arrow tables of `rows` rows, logging rows/s and the ETA every 5 s."""
    t0, last, done = time.time(), time.time(), 0
    for batch in dataset.with_format("arrow").iter(batch_size=rows):
        yield batch
        done += len(batch)
        if time.time() - last > 5:
            last, rate = time.time(), done / (time.time() - t0)
            log(f"  {what}: {done:,} / {len(dataset):,} sentences | {rate:,.0f}/s | "
                f"ETA {(len(dataset) - done) / rate:.0f}s")


# ---------------------------------------------------------------------------------------------------------
# Labelled data for the downstream tasks: SST trees, TSV files
# ---------------------------------------------------------------------------------------------------------
_PTB_BRACKETS = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}


def parse_tree(line: str):
    """One SST tree in PTB format, e.g. "(3 (2 It) (4 (3 works) (2 .)))" -> (root label, tokens, subtrees),
    subtrees = [(label, tokens)] for every node, the root first. Bracket tokens (-LRB- ...) become ( ) etc.
    Raises ValueError on malformed input."""
    pos, n = 0, len(line)
    subtrees = []

    def skip():
        nonlocal pos
        while pos < n and line[pos] == " ":
            pos += 1

    def node():
        nonlocal pos
        skip()
        if pos >= n or line[pos] != "(":
            raise ValueError(f"expected '(' at column {pos + 1}")
        pos += 1
        end = pos
        while end < n and line[end] not in " ()":
            end += 1
        label = int(line[pos:end])
        pos = end
        slot = len(subtrees)
        subtrees.append(None)
        skip()
        tokens = []
        if pos < n and line[pos] == "(":
            while pos < n and line[pos] == "(":
                tokens += node()
                skip()
        else:
            end = pos
            while end < n and line[end] != ")":
                end += 1
            word = line[pos:end].strip()
            if not word:
                raise ValueError(f"empty leaf at column {pos + 1}")
            tokens = [_PTB_BRACKETS.get(word, word)]
            pos = end
        if pos >= n or line[pos] != ")":
            raise ValueError(f"expected ')' at column {pos + 1}")
        pos += 1
        subtrees[slot] = (label, tokens)
        return tokens

    tokens = node()
    skip()
    if pos != n:
        raise ValueError(f"text after the tree at column {pos + 1}")
    return subtrees[0][0], tokens, subtrees


def read_tsv(path: str, columns: list[str], encoding="utf-8", skip_bad_lines=False):
    """A TSV file with a header row naming at least `columns` -> (line number, {column: value}) rows.
    A missing column is an error naming the file and the header found."""
    lines = read_lines(path, encoding, skip_bad_lines)
    try:
        _, header = next(lines)
    except StopIteration:
        raise UserError(f"{path} is empty; expected a TSV with a header row: {chr(9).join(columns)}") from None
    names = header.split("\t")
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"{path}: header has no column(s) {', '.join(missing)}; found {names[:6]} "
                        f"(expected a TSV header: {'<TAB>'.join(columns)})")
    index = [names.index(c) for c in columns]
    for number, line in lines:
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) <= max(index):
            raise UserError(f"{path}:{number}: expected {len(names)} tab-separated fields, found {len(parts)}")
        yield number, {c: parts[i] for c, i in zip(columns, index)}


def read_token_lines(path: str, n_fields: int, separator: str, layout: str, encoding="utf-8") -> list:
    """CoNLL-style files: one token a line, `n_fields` fields split on `separator`, a blank line between
    sentences -> sentences, each a list of field tuples. A line with another number of fields is an error
    naming the file, the line and the expected `layout`."""
    sentences, current = [], []
    for number, line in read_lines(path, encoding):
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        fields = line.split(separator)
        if len(fields) != n_fields or not all(fields):
            raise UserError(f"{path}:{number}: expected {layout} (a blank line between sentences), found "
                            f"{line[:60]!r}")
        current.append(tuple(fields))
    if current:
        sentences.append(current)
    if not sentences:
        raise UserError(f"{path} has no sentences (only blank lines); expected {layout} lines")
    return sentences


# ---------------------------------------------------------------------------------------------------------
# A task's text for the biLM (paper section 3.4: fine-tune the biLM on the task's text, labels dropped)
# ---------------------------------------------------------------------------------------------------------
def maximal_phrases(sentences: list[list[str]]) -> list[list[str]]:
    """Drop every token sequence that occurs inside a longer one (and repeats), keeping the first order.
    GLUE's SST-2 training set is the treebank's 67k *phrases*; the biLM should read its ~7k sentences,
    each once, not every sub-phrase again."""
    kept, spans = set(), set()
    for tokens in sorted({tuple(s) for s in sentences if s}, key=len, reverse=True):
        if tokens in spans:
            continue
        kept.add(tokens)
        spans.update(tokens[i:j] for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1))
    out, seen = [], set()
    for s in sentences:
        t = tuple(s)
        if t in kept and t not in seen:
            seen.add(t)
            out.append(s)
    return out


def write_lm_text(sentences: list[list[str]], path: str) -> int:
    """Sentences -> a text file for train_lm.py: one sentence a line, tokens joined by spaces (already cut
    as the task cuts them, which --tokenizer ptb leaves unchanged), written atomically. -> lines written."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for tokens in sentences:
            f.write(" ".join(tokens) + "\n")
    os.replace(tmp, path)
    return len(sentences)
