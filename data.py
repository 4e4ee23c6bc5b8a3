"""Data for ELMo: tokenisation, vocabularies, character ids, corpus loading and length-bucketed batches.

Every script reads text through this module, so a corpus is tokenised, validated and batched the same way
for pretraining and for the downstream tasks.

    from data import batch_to_ids
    ids = batch_to_ids([["Hello", "world", "!"], ["Hi"]])    # (2, 3, 50) LongTensor, 0 = padding

Character ids (exactly AllenNLP's `ELMoCharacterMapper`): a token is its UTF-8 bytes cut to 48, wrapped in
begin-of-word (258) / end-of-word (259) marks and padded with 260 to 50 positions; every id is then shifted
by +1 so that 0 can mean "no token here". The sentence boundaries <S> / </S> are the one-"character" words
256 / 257; a literal "<S>" or "</S>" in the text maps to them too (AllenNLP does the same).

Local files and hub data sets take one path: both become an iterable of raw lines, which `tokenize`
splits and `encode_corpus` packs into one flat int32 tensor of token-type ids (memory: 4 bytes a token).
"""
from __future__ import annotations

import itertools
import os
import random
import re

import torch

MAX_CHARS = 50                      # W: characters per token, word marks included (as the original)
PAD_ID = 0                          # padding token: char id 0 and word id 0
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260   # before the +1 shift
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<S>", "</S>", "<unk>", "<pad>"
SPECIALS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]   # ids 0-3 of every LM vocabulary


class UserError(Exception):
    """A problem the user can fix (a bad path, a bad flag, a bad file). Scripts print it as one line and
    exit with status 2; no traceback."""


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


def boundary_char_ids(device=None):
    """The character ids of <S> and </S>: two (W,) tensors."""
    return (torch.tensor(BOS_CHAR_IDS, device=device), torch.tensor(EOS_CHAR_IDS, device=device))


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
        raise UserError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory, expected a file: {path}")
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


def hub_dataset(name: str, config: str | None, split: str, local_flags: str):
    """A Hugging Face hub data set split (Arrow, memory-mapped: larger than RAM is fine). Fails fast, in one
    line naming the local-file flags, when the hub cannot be reached or the data set cannot be loaded."""
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {name} (offline?); use local files: "
                        f"{local_flags}")
    import datasets  # imported lazily: local-file runs never pay its import time
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


def read_corpus(paths: list[str], tokenizer: str, max_length: int, encoding="utf-8",
                skip_bad_lines=False, log=print) -> list[list[str]]:
    """Local text files, one sentence a line -> list of token lists. Blank lines are skipped; sentences
    longer than max_length are split (counted and reported once); an empty result is an error."""
    sentences, stats, n_split = [], {}, 0
    for path in paths:
        for _, line in read_lines(path, encoding, skip_bad_lines, stats):
            tokens = tokenize(line, tokenizer)
            if tokens:
                pieces = split_long(tokens, max_length)
                n_split += len(pieces) > 1
                sentences.extend(pieces)
    if stats.get("skipped"):
        log(f"skipped {stats['skipped']:,} undecodable lines (--skip-bad-lines)")
    if n_split:
        log(f"split {n_split:,} sentences longer than --max-length {max_length} tokens")
    if not sentences:
        raise UserError(f"no usable text in {', '.join(paths)} (empty, or only blank lines)")
    return sentences


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and corpus encoding
# ---------------------------------------------------------------------------------------------------------
def build_vocab(sentences: list[list[str]], max_size: int) -> list[str]:
    """The LM softmax vocabulary: SPECIALS, then the most frequent training tokens (ties: first seen), at
    most max_size words in all. A literal `<unk>` in the text (PTB) is the same `<unk>`."""
    counts: dict[str, int] = {}
    for sentence in sentences:
        for w in sentence:
            counts[w] = counts.get(w, 0) + 1
    words = sorted((w for w in counts if w not in SPECIALS), key=lambda w: -counts[w])
    return SPECIALS + words[: max(0, max_size - len(SPECIALS))]


class Corpus:
    """Sentences packed for speed and memory: token *types* (distinct strings) with their character ids and
    LM-vocabulary ids computed once, and the text as one flat int32 tensor of type ids with offsets."""

    def __init__(self, sentences: list[list[str]], vocab: list[str]):
        type_index: dict[str, int] = {}
        flat, lengths = [], []
        for sentence in sentences:
            lengths.append(len(sentence))
            flat.extend(type_index.setdefault(w, len(type_index)) for w in sentence)
        self.types = list(type_index)                                           # type id -> string
        self.lengths = torch.tensor(lengths, dtype=torch.long)                  # (S,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.tokens = torch.tensor(flat, dtype=torch.int32)                     # (total,)
        stoi = {w: i for i, w in enumerate(vocab)}
        unk = stoi[UNK_TOKEN]
        # per type: its character ids (for the CNN) and its LM-vocabulary id (the softmax target)
        self.type_chars = torch.tensor([word_to_char_ids(w) for w in self.types], dtype=torch.long)
        self.type_vocab = torch.tensor([stoi.get(w, unk) for w in self.types], dtype=torch.long)
        self.n_unk = int((self.type_vocab[self.tokens.long()] == unk).sum()) if len(flat) else 0

    def __len__(self):
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def batch(self, indices: list[int], char_inputs: bool):
        """Sentences `indices` -> model inputs (B, T, W) char ids or (B, T) vocab ids, and LM targets
        (B, T+2) = vocab ids of <S> w_1 .. w_n </S>, PAD_ID after."""
        lengths = self.lengths[indices]
        B, T = len(indices), int(lengths.max())
        types = torch.full((B, T), -1, dtype=torch.long)
        for b, i in enumerate(indices):
            types[b, : lengths[b]] = self.tokens[self.offsets[i]: self.offsets[i + 1]]
        real = types >= 0
        safe = types.clamp(min=0)
        vocab_ids = torch.where(real, self.type_vocab[safe], PAD_ID)                 # (B, T)
        targets = torch.zeros(B, T + 2, dtype=torch.long)
        targets[:, 1:-1] = vocab_ids
        targets[:, 0] = SPECIALS.index(BOS_TOKEN)
        targets[torch.arange(B), lengths + 1] = SPECIALS.index(EOS_TOKEN)
        if char_inputs:
            inputs = torch.where(real.unsqueeze(-1), self.type_chars[safe], PAD_ID)  # (B, T, W)
        else:
            inputs = vocab_ids
        return inputs, targets


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
