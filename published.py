"""The published ELMo models -> our biLM's weights: AllenNLP's files (bilm-tf's weights HDF5 + options JSON)
both ways, and the folders and .zip archives of the NLPL repository and of ELMoForManyLangs, each quirk of
the original code commented where it is handled.

    find_options        X_weights.hdf5 -> X_options.json beside it (or options.json, or the path given)
    read_options        options JSON -> our config values (a dict of `elmo.ELMoConfig` fields)
    official_layout     every dataset of a weight file, with its TensorFlow shape
    read_official       options + weights -> (config values, our state_dict), every shape checked first
    official_weights    (config values, our state_dict) -> (options, datasets): the inverse, step by step
    convert_official    options + weights -> one of our biLM checkpoints (`python elmo.py convert`)
    export_official     config + state -> DIR/options.json + DIR/weights.hdf5 (`python elmo.py export`)
    local_copy          a path, or an http(s) URL downloaded once into the cache folder and reused
    read_published      any published model: AllenNLP's pair, an NLPL or ELMoForManyLangs folder or .zip
    read_nlpl           the NLPL repository's layout: *.hdf5 + options.json (bilm-tf's, read as above)
    read_elmoformanylangs  its layout: config.json, the network configuration, *.dic, *.pkl (PyTorch)

This module works on plain values (config dicts, state dicts, arrays), not on the model's classes:
`elmo.load_elmo` builds the biLM from what `read_published` returns.
"""
from __future__ import annotations

import io
import json
import os

import torch

from elmo_pytorch.data import MAX_CHARS, check_file, default_cache_dir
from elmo_pytorch.runtime import CHECKPOINT_FORMAT, MissingFile, UserError, disk_full, is_disk_full, safe_load


def find_options(weights: str, options: str | None = None) -> str:
    """The options file of a published weight file: `options` when given; else the published naming, where
    `elmo_2x1024_128_2048cnn_1xhighway_weights.hdf5` comes with `..._options.json` beside it; else
    `options.json` in the same folder."""
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


def read_options(path: str, text: bytes | None = None) -> dict:
    """A published options JSON (the file at `path`, or its bytes `text` from an archive, which `path` then
    names) -> our config values (`elmo.ELMoConfig` fields). The keys read are the ones bilm-tf and AllenNLP
    read."""
    try:
        if text is None:
            with open(path, "rb") as f:
                text = f.read()
        options = json.loads(text.decode("utf-8"))
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
        config = dict(
            token_encoder="char", n_characters=262, char_embed_dim=int(need("char_cnn", "embedding")["dim"]),
            filters=[[int(w), int(n)] for w, n in need("char_cnn", "filters")],
            n_highway=int(cnn.get("n_highway") or 0),
            lstm_dim=int(need("lstm", "dim")), projection_dim=int(need("lstm", "projection_dim")),
            n_layers=int(lstm.get("n_layers", 1)),           # bilm-tf's default
            # bilm-tf passes the values to TensorFlow's LSTMCell, where None (or absent) means no clipping
            cell_clip=float(lstm.get("cell_clip") or 0), proj_clip=float(lstm.get("proj_clip") or 0),
            residual=bool(need("lstm", "use_skip_connections")), dropout=0.0, vocab_size=0)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"options file {path} does not describe a biLM we can build: {e}") from None
    if not 0 < config["projection_dim"] < config["lstm_dim"] or config["n_layers"] < 1:
        raise UserError(f"options file {path} does not describe a biLM we can build: it needs 0 < "
                        f"projection_dim < dim and n_layers >= 1")
    return config


def official_layout(config: dict):
    """Every dataset of a published weight file: (name, shape in the file). The shapes are TensorFlow's:
    a dense layer's kernel is (in, out) because TF computes x @ W; an LSTM layer's kernel W_0 stacks the
    input's rows over the recurrent output's, (in + P, 4D), because TF's LSTMCell multiplies [x; h] by it."""
    C, D, P = config["char_embed_dim"], config["lstm_dim"], config["projection_dim"]
    Fn = sum(n for _, n in config["filters"])                                # F, all filters
    layout = [("char_embed", (config["n_characters"] - 1, C))]             # no row for the padding id 0
    for k, (width, n) in enumerate(config["filters"]):
        layout += [(f"CNN/W_cnn_{k}", (1, width, C, n)), (f"CNN/b_cnn_{k}", (n,))]   # a conv2d of height 1
    for k in range(config["n_highway"]):
        layout += [(f"CNN_high_{k}/{w}_{part}", (Fn, Fn) if w == "W" else (Fn,))
                   for part in ("carry", "transform") for w in ("W", "b")]
    layout += [("CNN_proj/W_proj", (Fn, P)), ("CNN_proj/b_proj", (P,))]
    for direction in (0, 1):                                                # 0 forward, 1 backward
        for k in range(config["n_layers"]):
            cell = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"
            layout += [(f"{cell}/W_0", (P + P, 4 * D)), (f"{cell}/B", (4 * D,)), (f"{cell}/W_P_0", (D, P))]
    return layout


def tf_gate_order(D: int):
    """TF's LSTMCell orders the gates i, j (candidate), f, o; torch orders them i, f, g (candidate), o. This
    index moves rows from one order to the other; it swaps the two middle blocks, so it is its own inverse."""
    return torch.cat([torch.arange(0, D), torch.arange(2 * D, 3 * D), torch.arange(D, 2 * D),
                      torch.arange(3 * D, 4 * D)])


def read_official(options_file: str, weights_file: str) -> tuple[dict, dict]:
    """A published options JSON + HDF5 weight file -> (our config values, our state_dict), no LM softmax
    (the files have none)."""
    config = read_options(options_file)
    return config, read_weights(config, check_file(weights_file, "weights file"), weights_file, options_file)


def read_weights(config: dict, source, weights_file: str, options_file: str) -> dict:
    """A published HDF5 weight file (`source`: its path, or a binary file object holding it) -> our
    state_dict for `config`. Every dataset is checked against the shape the options imply before anything
    is converted, so a file that is truncated, lacks a dataset or belongs to other options is one error line
    naming it (`weights_file`, `options_file`: the names the messages use)."""
    try:
        import h5py  # only needed here: official weights are HDF5
    except ImportError:
        raise UserError("reading official weights needs h5py: pip install h5py") from None
    arrays = {}
    try:
        with h5py.File(source, "r") as h5:
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
    return state_from_official(arrays, config)


def state_from_official(arrays: dict, config: dict) -> dict:
    """Datasets of a published weight file (name -> tensor, TF layout) -> our state_dict."""
    state = {}
    # char embedding: the file has no row for id 0 (padding); AllenNLP and bilm-tf prepend a zero row
    char_embed = arrays["char_embed"]
    state["token_encoder.char_embed.weight"] = torch.cat([torch.zeros(1, char_embed.shape[1]), char_embed])
    for k in range(len(config["filters"])):
        # TF conv2d kernel (1, width, C, F_k) -> torch Conv1d (F_k, C, width)
        state[f"token_encoder.convs.{k}.weight"] = arrays[f"CNN/W_cnn_{k}"][0].permute(2, 1, 0)
        state[f"token_encoder.convs.{k}.bias"] = arrays[f"CNN/b_cnn_{k}"]
    for k in range(config["n_highway"]):
        for part in ("transform", "carry"):  # TF computes x @ W, torch x @ W.T
            state[f"token_encoder.highways.{k}.{part}.weight"] = arrays[f"CNN_high_{k}/W_{part}"].T
            state[f"token_encoder.highways.{k}.{part}.bias"] = arrays[f"CNN_high_{k}/b_{part}"]
    state["token_encoder.proj.weight"] = arrays["CNN_proj/W_proj"].T
    state["token_encoder.proj.bias"] = arrays["CNN_proj/b_proj"]
    D, P = config["lstm_dim"], config["projection_dim"]
    order = tf_gate_order(D)
    for direction, stack in ((0, "forward_lstm"), (1, "backward_lstm")):
        for k in range(config["n_layers"]):
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


def official_weights(config: dict, state: dict) -> tuple[dict, dict]:
    """Our biLM's config values and state_dict -> (options dict, {dataset name: float32 array}) in the
    published layout: the inverse of `state_from_official`, step by step, so bilm-tf and AllenNLP load a biLM
    trained here unchanged. The LM softmax is not part of it (the published files have none)."""
    if config["token_encoder"] != "char":
        raise UserError("only character-CNN biLMs have a published layout (this one uses word embeddings)")
    if config.get("chars") is not None or config.get("words") is not None:
        raise UserError("only biLMs that read UTF-8 characters have AllenNLP's layout (this one reads its own "
                        "dictionaries, as ELMoForManyLangs' models do)")
    s = {k: v.detach().float().cpu() for k, v in state.items()}
    arrays = {"char_embed": s["token_encoder.char_embed.weight"][1:]}          # drop the padding row
    for k in range(len(config["filters"])):
        arrays[f"CNN/W_cnn_{k}"] = s[f"token_encoder.convs.{k}.weight"].permute(2, 1, 0)[None]
        arrays[f"CNN/b_cnn_{k}"] = s[f"token_encoder.convs.{k}.bias"]
    for k in range(config["n_highway"]):
        for part in ("transform", "carry"):
            arrays[f"CNN_high_{k}/W_{part}"] = s[f"token_encoder.highways.{k}.{part}.weight"].T
            arrays[f"CNN_high_{k}/b_{part}"] = s[f"token_encoder.highways.{k}.{part}.bias"]
    arrays["CNN_proj/W_proj"] = s["token_encoder.proj.weight"].T
    arrays["CNN_proj/b_proj"] = s["token_encoder.proj.bias"]
    D = config["lstm_dim"]
    order = tf_gate_order(D)
    for direction, stack in ((0, "forward_lstm"), (1, "backward_lstm")):
        for k in range(config["n_layers"]):
            cell, prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell", f"{stack}.layers.{k}.lstm"
            W = torch.cat([s[f"{prefix}.weight_ih_l0"], s[f"{prefix}.weight_hh_l0"]], dim=1)  # (4D, in + P)
            arrays[f"{cell}/W_0"] = W[order].T
            # B = bias_ih + bias_hh - the 1.0 TF adds itself; bias_hh - 1.0 is exactly 0 for converted weights
            b_hh = s[f"{prefix}.bias_hh_l0"] - forget_one(D)
            arrays[f"{cell}/B"] = (s[f"{prefix}.bias_ih_l0"] + b_hh)[order]
            arrays[f"{cell}/W_P_0"] = s[f"{prefix}.weight_hr_l0"].T
    c = config
    options = {
        "lstm": {"use_skip_connections": c["residual"], "projection_dim": c["projection_dim"],
                 # null, not 0: TensorFlow's LSTMCell would clip at 0 (AllenNLP and bilm-tf read null as off)
                 "cell_clip": c["cell_clip"] or None, "proj_clip": c["proj_clip"] or None,
                 "dim": c["lstm_dim"], "n_layers": c["n_layers"]},
        "char_cnn": {"activation": "relu", "filters": c["filters"], "n_highway": c["n_highway"],
                     "embedding": {"dim": c["char_embed_dim"]}, "n_characters": c["n_characters"],
                     "max_characters_per_token": MAX_CHARS}}
    return options, {name: arrays[name].contiguous().numpy() for name, _ in official_layout(config)}


def export_official(config: dict, state: dict, out_dir: str) -> tuple[str, str]:
    """A biLM's config values and state_dict -> `out_dir/options.json` and `out_dir/weights.hdf5` (the
    published layout). Both are written under temporary names first and renamed at the end: an interrupted
    export leaves no half file."""
    import h5py
    options, arrays = official_weights(config, state)
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
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(paths[1], f"nothing in {out_dir} was replaced",
                            needed=sum(a.nbytes for a in arrays.values())) from None
        raise
    finally:
        for t in tmp:
            if os.path.exists(t):
                os.unlink(t)
    return paths


def convert_official(options_file: str, weights_file: str) -> dict:
    """A published pair of files -> one of our self-describing biLM checkpoints (tensors and plain
    containers; the config remembers the clipping). It has no vocabulary and no LM softmax: it gives ELMo
    vectors everywhere a train_lm.py checkpoint does, but no perplexity."""
    config, state = read_official(options_file, weights_file)
    return {"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": config, "vocab": None, "model": state,
            "step": 0,
            "args": {"converted_from": {"options": os.path.abspath(options_file),
                                        "weights": os.path.abspath(weights_file)}}}


def local_copy(path_or_url, cache_dir: str | None = None, timeout: float = 60.0, log=None) -> str:
    """A local path (str or pathlib.Path) is returned as it is; an http(s) URL is downloaded once into
    `cache_dir` (default: the `published` folder of the data cache, `$ELMO_DATA_CACHE` or
    ~/.cache/elmo-pytorch) and that copy is returned, now and on every later call. Files from one URL folder
    land in one local folder under their own names, so a published pair stays a pair (`find_options`). The
    download goes to a temporary name first: an interrupted one never stands under the final name."""
    import hashlib
    import http.client
    import shutil
    import urllib.parse
    import urllib.request
    text = os.fspath(path_or_url)
    if not text.startswith(("http://", "https://")):
        return text
    folder_url, name = text.rsplit("/", 1)
    folder = os.path.join(cache_dir or os.path.join(default_cache_dir(), "published"),
                          hashlib.sha256(folder_url.encode()).hexdigest()[:16])
    path = os.path.join(folder, urllib.parse.unquote(name) or "download")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    if log:
        log(f"downloading {text} -> {path}")
    try:
        with urllib.request.urlopen(text, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:   # URLError, HTTPError, timeouts, a full disk; a cut body
        if is_disk_full(e):
            raise disk_full(path, "nothing was kept") from None
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {text} ({reason}); download it where you can and pass the local "
                        f"file's path instead of the URL") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------
# Model folders and .zip archives: the NLPL repository's (bilm-tf's weights, read as AllenNLP's above) and
# ELMoForManyLangs' (PyTorch state dicts and its own dictionaries). An archive is read in place.
# ---------------------------------------------------------------------------------------------------------
def read_published(path: str, options: str | None = None) -> tuple[dict, dict]:
    """Any published model -> (our config values, our state_dict), no LM softmax:
        X_weights.hdf5 (+ its options)                AllenNLP's pair of files (`find_options`)
        a folder or .zip: *.hdf5 and options.json     the NLPL repository's bilm-tf models (`read_nlpl`)
        a folder or .zip: config.json, *.pkl, *.dic   ELMoForManyLangs' (`read_elmoformanylangs`), also in
                                                      the NLPL repository (its CoNLL 2017 models)"""
    if path.endswith((".hdf5", ".h5")):
        return read_official(find_options(path, options), path)
    files = ModelFiles(path)
    if "encoder.pkl" in files.names or "config.json" in files.names:
        return read_elmoformanylangs(files)
    return read_nlpl(files, options)


class ModelFiles:
    """The files of a model in a folder or in a .zip archive, by name: `names`, `read(name)` -> bytes,
    `where(name)` -> how a message names it. An archive is read in place, nothing unpacked to disk; its
    files may sit in a folder of their own (the shallowest folder that holds files is the model's)."""

    def __init__(self, path: str):
        import zipfile
        self.path, self.zip = path, None
        if os.path.isdir(path):
            self.names = sorted(os.listdir(path))
            return
        if not os.path.exists(path):
            raise MissingFile(f"model not found: {path}")
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{path} is not a readable .zip archive (truncated, or another kind of file: {e})") \
                from None
        members = [m for m in self.zip.namelist() if not m.endswith("/")]
        top = min((m.count("/") for m in members), default=0)
        self.members = {m.rsplit("/", 1)[-1]: m for m in members if m.count("/") == top}
        self.names = sorted(self.members)

    def where(self, name: str) -> str:
        return f"{self.path}:{self.members[name]}" if self.zip else os.path.join(self.path, name)

    def read(self, name: str) -> bytes:
        """The bytes of one file; a member of an archive is checked against its CRC as it is read."""
        try:
            if self.zip:
                return self.zip.read(self.members[name])
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except Exception as e:  # noqa: BLE001  (OSError; BadZipFile for a bad CRC; zlib.error, EOFError)
            raise UserError(f"{self.where(name)} cannot be read (a damaged archive or file: {e})") from None

    def need(self, name: str, layout: str) -> str:
        if name not in self.names:
            raise MissingFile(f"{self.path} has no {name}: {layout}")
        return name

    def json(self, name: str) -> dict:
        try:
            value = json.loads(self.read(name).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.where(name)} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise UserError(f"{self.where(name)} is not a JSON object")
        return value


NLPL_LAYOUT = "the NLPL repository's models hold model.hdf5 (bilm-tf's weights) and options.json"
EFML_LAYOUT = "ELMoForManyLangs' models hold config.json, encoder.pkl, token_embedder.pkl, char.dic and word.dic"


def read_nlpl(files: ModelFiles, options: str | None = None) -> tuple[dict, dict]:
    """An NLPL repository model (a folder or its .zip, as simple_elmo reads it): bilm-tf's weights in
    `model.hdf5` (else the first *.hdf5) and `options.json` (or the file `options` names), read as AllenNLP's
    pair of files. Its vocab.txt only saves time in simple_elmo, which our token memo saves anyway."""
    weights = "model.hdf5" if "model.hdf5" in files.names else next(
        (n for n in files.names if n.endswith(".hdf5")), None)
    if weights is None:
        raise MissingFile(f"{files.path} holds no weight file (*.hdf5): {NLPL_LAYOUT}; {EFML_LAYOUT}")
    if options:
        config = read_options(check_file(options, "options file"))
    else:
        config = read_options(files.where(files.need("options.json", NLPL_LAYOUT)), files.read("options.json"))
    source = io.BytesIO(files.read(weights)) if files.zip else os.path.join(files.path, weights)
    return config, read_weights(config, source, files.where(weights), options or files.where("options.json"))


def read_elmoformanylangs(files: ModelFiles) -> tuple[dict, dict]:
    """An ELMoForManyLangs model (HIT-SCIR, CoNLL 2018; what its `Embedder(model_dir)` reads) -> our config
    values and state_dict. Its network is ELMo's biLM trained in PyTorch rather than converted from
    TensorFlow, with details of its own, each handled where (1)-(4) mark it and tested against its outputs:
      1. a word embedding beside the character CNN, [word; characters] into the projection (either may be
         absent: char_dim or word_dim 0); characters and words are ids in its own dictionaries
         (`data.Dictionaries`, which also cuts tokens to 48 characters, as it does), not UTF-8 bytes;
      2. its batcher reads the two word marks' ids swapped, so every word it learnt from starts with <eow>'s
         id and ends with <bow>'s;
      3. its highway is AllenNLP's: one Linear, whose second half gates the *input* (ours gates the
         transform, as bilm-tf's: the same function, that half negated);
      4. its LSTM is AllenNLP's cell trained from scratch: the stored bias is the whole bias, with no 1.0
         to add to the forget gate as TensorFlow's weights need.
    The rest is ELMo's, as here: layer 0 is the token vector twice, a residual connection from the second
    LSTM layer on, clipping at the configured values. It carries its LSTM state from batch to batch; ours
    is stateless, and equals its first call on a fresh model with every sentence in one batch."""
    where = files.where(files.need("config.json", EFML_LAYOUT))
    network = efml_network(files, files.json("config.json").get("config_path"))
    enc, emb = network.get("encoder", {}), network.get("token_embedder", {})
    try:
        word_dim, char_dim = int(emb.get("word_dim") or 0), int(emb.get("char_dim") or 0)
        config = dict(
            token_encoder="char" if char_dim else "word", word_embed_dim=word_dim or 300,
            lstm_dim=int(enc["dim"]), projection_dim=int(enc["projection_dim"]), n_layers=int(enc["n_layers"]),
            cell_clip=float(enc.get("cell_clip") or 0), proj_clip=float(enc.get("proj_clip") or 0),
            residual=True, dropout=0.0, vocab_size=0)
        if char_dim:
            config |= dict(char_embed_dim=char_dim, n_highway=int(emb.get("n_highway") or 0),
                           filters=[[int(w), int(n)] for w, n in emb["filters"]])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{where}: its network configuration does not describe a biLM we can build "
                        f"({type(e).__name__}: {e})") from None
    if str(enc.get("name", "elmo")).lower() != "elmo" or str(emb.get("name", "cnn")).lower() != "cnn" \
            or emb.get("activation", "relu") != "relu" or emb.get("max_characters_per_token", MAX_CHARS) != MAX_CHARS:
        raise UserError(f"{where}: only ELMo's biLM over a relu character CNN of {MAX_CHARS} characters a "
                        f"token is supported (found encoder {enc.get('name')!r}, token embedder "
                        f"{emb.get('name')!r}, {emb.get('activation')!r}, {emb.get('max_characters_per_token')})")
    if word_dim < 0 or char_dim < 0 or not (word_dim or char_dim) or config["n_layers"] < 1 \
            or not 0 < config["projection_dim"] < config["lstm_dim"] \
            or (char_dim and (not config["filters"] or min(map(min, config["filters"])) < 1)):
        raise UserError(f"{where}: impossible sizes in its network configuration (it needs word_dim or "
                        f"char_dim > 0, 0 < projection_dim < dim, n_layers >= 1 and positive filters)")
    # (1) its dictionaries: the special entries its batcher looks up must be there
    config["chars"] = read_dic(files, "char.dic", ("<bow>", "<eow>", "<pad>", "<oov>", "<bos>", "<eos>")) \
        if char_dim else None
    config["words"] = read_dic(files, "word.dic", ("<oov>", "<pad>")) if word_dim else None
    if char_dim:     # (2) the two marks in the roles its model learnt: <eow>'s id starts a word
        chars = config["chars"]
        chars["<bow>"], chars["<eow>"] = chars["<eow>"], chars["<bow>"]
        config["n_characters"] = len(chars) + 1                  # + our id 0, "no token"
    token_embedder, encoder = (efml_state_dict(files, name) for name in ("token_embedder.pkl", "encoder.pkl"))
    check_layout(files, "token_embedder.pkl", token_embedder, efml_token_layout(config))
    check_layout(files, "encoder.pkl", encoder, efml_encoder_layout(config))
    return config, state_from_efml(config, token_embedder, encoder)


# ELMoForManyLangs' network configuration, which every published folder names by a path on its authors'
# machines (config.json's "config_path"); ELMoForManyLangs then reads the file of that name it ships in
# elmoformanylangs/configs/, whose two files (cnn_50_100_... and cnn_0_100_...) hold the same values: a
# word embedding of 100 and a character CNN over embeddings of 50, 2 highways, 2 layers of 4096 cells
# projected to 512, clipped at 3. Written out here from those files.
EFML_NETWORK = {
    "encoder": {"name": "elmo", "projection_dim": 512, "cell_clip": 3, "proj_clip": 3, "dim": 4096, "n_layers": 2},
    "token_embedder": {"name": "cnn", "activation": "relu", "n_highway": 2, "word_dim": 100, "char_dim": 50,
                       "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
                       "max_characters_per_token": 50}}
EFML_NETWORKS = ("cnn_50_100_512_4096_sample.json", "cnn_0_100_512_4096_sample.json")


def efml_network(files: ModelFiles, config_path) -> dict:
    """The network configuration config.json names, found where ELMoForManyLangs looks: the path as given
    (relative to the folder), the file of that name in the folder, then its own configurations by name."""
    if not isinstance(config_path, str) or not config_path:
        raise UserError(f"{files.where('config.json')} has no 'config_path' (the network configuration's file)")
    name = os.path.basename(config_path)
    if not files.zip and os.path.isfile(os.path.join(files.path, config_path)):
        return files.json(config_path)                  # a folder's files: any path relative to it, or absolute
    if name in files.names:
        return files.json(name)
    if name in EFML_NETWORKS:
        return EFML_NETWORK
    raise MissingFile(f"{files.where('config.json')} names the network configuration {config_path}, which is "
                      f"neither in {files.path} nor one of ELMoForManyLangs' own ({', '.join(EFML_NETWORKS)})")


def read_dic(files: ModelFiles, name: str, specials: tuple) -> dict:
    """A dictionary file (char.dic, word.dic) -> {token: id}, read as ELMoForManyLangs reads it: a line is
    stripped, then cut at tabs into "token<TAB>id"; a token of whitespace, which the stripping removes,
    leaves the id alone, and it is filed under U+3000 (the ideographic space); a token met twice keeps its
    last id."""
    files.need(name, EFML_LAYOUT)
    try:
        text = files.read(name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{files.where(name)} is not UTF-8 text (byte {e.start})") from None
    table = {}
    for number, line in enumerate(text.splitlines(), start=1):   # Python's line breaks, as codecs' reader's
        if not line:
            continue
        fields = line.strip().split("\t")
        if len(fields) == 1:
            fields.insert(0, "\u3000")
        if len(fields) != 2 or not fields[1].isdigit():
            raise UserError(f"{files.where(name)}:{number}: expected 'token<TAB>id', found {line[:60]!r}")
        table[fields[0]] = int(fields[1])
    missing = [s for s in specials if s not in table]
    if missing:
        raise UserError(f"{files.where(name)} lacks {', '.join(missing)}, which ELMoForManyLangs' batcher needs")
    if max(table.values()) >= len(table):
        raise UserError(f"{files.where(name)}: id {max(table.values())} is beyond its {len(table)} entries "
                        f"(the embedding has one row per entry)")
    return table


def efml_state_dict(files: ModelFiles, name: str) -> dict:
    """A .pkl of the model: a state dict, loaded with weights_only=True (a pickle that would run code is
    refused, unrun)."""
    state = safe_load(io.BytesIO(files.read(files.need(name, EFML_LAYOUT))), files.where(name), "state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{files.where(name)} is not a state dict (a dictionary of tensors)")
    return state


def efml_token_layout(config: dict) -> dict:
    """Every tensor of token_embedder.pkl (ELMoForManyLangs' ConvTokenEmbedder) -> its shape."""
    c, layout, F = config, {}, 0
    if c["words"] is not None:
        layout["word_emb_layer.embedding.weight"] = (len(c["words"]), c["word_embed_dim"])
    if c["chars"] is not None:
        layout["char_emb_layer.embedding.weight"] = (len(c["chars"]), c["char_embed_dim"])
        for k, (width, n) in enumerate(c["filters"]):
            layout |= {f"convolutions.{k}.weight": (n, c["char_embed_dim"], width), f"convolutions.{k}.bias": (n,)}
        F = sum(n for _, n in c["filters"])
        for k in range(c["n_highway"]):
            layout |= {f"highways._layers.{k}.weight": (2 * F, F), f"highways._layers.{k}.bias": (2 * F,)}
    in_dim = F + (c["word_embed_dim"] if c["words"] is not None else 0)
    return layout | {"projection.weight": (c["projection_dim"], in_dim), "projection.bias": (c["projection_dim"],)}


def efml_encoder_layout(config: dict) -> dict:
    """Every tensor of encoder.pkl (ELMoForManyLangs' ElmobiLm: LstmCellWithProjection layers) -> its shape."""
    D, P, layout = config["lstm_dim"], config["projection_dim"], {}
    for k in range(config["n_layers"]):
        for direction in ("forward", "backward"):
            cell = f"{direction}_layer_{k}"
            layout |= {f"{cell}.input_linearity.weight": (4 * D, P), f"{cell}.state_linearity.weight": (4 * D, P),
                       f"{cell}.state_linearity.bias": (4 * D,), f"{cell}.state_projection.weight": (P, D)}
    return layout


def check_layout(files: ModelFiles, name: str, state: dict, layout: dict):
    """A state dict holds exactly the tensors its configuration and dictionaries describe, each of the shape
    they imply; otherwise one line naming the first that does not."""
    for key, shape in layout.items():
        if key not in state:
            raise UserError(f"{files.where(name)} has no '{key}': it does not belong to this config.json "
                            f"and its network configuration")
        if tuple(state[key].shape) != shape:
            raise UserError(f"{files.where(name)}: '{key}' has shape {tuple(state[key].shape)}, but the network "
                            f"configuration and the dictionaries (one row per entry) need {shape}: they do not "
                            f"belong together")
    extra = sorted(set(state) - set(layout))
    if extra:
        raise UserError(f"{files.where(name)} has '{extra[0]}', which its network configuration does not "
                        f"describe (a char_dim or word_dim of 0 for a part that is there?)")


def state_from_efml(config: dict, emb: dict, enc: dict) -> dict:
    """ELMoForManyLangs' two state dicts -> ours."""
    def with_no_token_row(weight):       # our ids are the dictionary's + 1: row 0 is "no token", zeros
        return torch.cat([weight.new_zeros(1, weight.shape[1]), weight.float()])
    state = {"token_encoder.proj.weight": emb["projection.weight"], "token_encoder.proj.bias": emb["projection.bias"]}
    if config["chars"] is None:                                   # words only: elmo.WordEncoder
        state["token_encoder.embed.weight"] = with_no_token_row(emb["word_emb_layer.embedding.weight"])
    else:
        state["token_encoder.char_embed.weight"] = with_no_token_row(emb["char_emb_layer.embedding.weight"])
        if config["words"] is not None:                           # (1) the word embedding beside the CNN
            state["token_encoder.word_embed.weight"] = with_no_token_row(emb["word_emb_layer.embedding.weight"])
        for k in range(len(config["filters"])):                   # Conv1d's layout on both sides
            state[f"token_encoder.convs.{k}.weight"] = emb[f"convolutions.{k}.weight"]
            state[f"token_encoder.convs.{k}.bias"] = emb[f"convolutions.{k}.bias"]
        for k in range(config["n_highway"]):
            # (3) AllenNLP's highway: y = g x + (1 - g) relu(A x), g = sigmoid(B x + b), [A; B] one Linear.
            # Ours: y = t relu(A x) + (1 - t) x, t = sigmoid(W_carry x + b_carry): t = 1 - g, so the carry
            # half is -B, -b.
            W, b = emb[f"highways._layers.{k}.weight"], emb[f"highways._layers.{k}.bias"]
            F = W.shape[1]
            state[f"token_encoder.highways.{k}.transform.weight"] = W[:F]
            state[f"token_encoder.highways.{k}.transform.bias"] = b[:F]
            state[f"token_encoder.highways.{k}.carry.weight"] = -W[F:]
            state[f"token_encoder.highways.{k}.carry.bias"] = -b[F:]
    for direction in ("forward", "backward"):
        for k in range(config["n_layers"]):
            cell, ours = f"{direction}_layer_{k}", f"{direction}_lstm.layers.{k}.lstm"
            # AllenNLP's cell orders its gates i, f, g, o as torch does: the weights go over unchanged
            state[f"{ours}.weight_ih_l0"] = enc[f"{cell}.input_linearity.weight"]
            state[f"{ours}.weight_hh_l0"] = enc[f"{cell}.state_linearity.weight"]
            state[f"{ours}.weight_hr_l0"] = enc[f"{cell}.state_projection.weight"]
            state[f"{ours}.bias_ih_l0"] = enc[f"{cell}.state_linearity.bias"]
            state[f"{ours}.bias_hh_l0"] = torch.zeros(4 * config["lstm_dim"])    # (4) nothing added
    return {k: v.float().contiguous() for k, v in state.items()}
