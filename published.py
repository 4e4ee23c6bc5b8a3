"""The published ELMo files (bilm-tf's weights HDF5 + options JSON, as AllenNLP distributes them) <-> our
biLM's weights, both ways, with every TensorFlow quirk commented where it is handled.

    find_options        X_weights.hdf5 -> X_options.json beside it (or options.json, or the path given)
    read_options        options JSON -> our config values (a dict of `elmo.ELMoConfig` fields)
    official_layout     every dataset of a weight file, with its TensorFlow shape
    read_official       options + weights -> (config values, our state_dict), every shape checked first
    official_weights    (config values, our state_dict) -> (options, datasets): the inverse, step by step
    convert_official    options + weights -> one of our biLM checkpoints (`python elmo.py convert`)
    export_official     config + state -> DIR/options.json + DIR/weights.hdf5 (`python elmo.py export`)
    local_copy          a path, or an http(s) URL downloaded once into the cache folder and reused

This module works on plain values (config dicts, state dicts, arrays), not on the model's classes:
`elmo.load_elmo` builds the biLM from what `read_official` returns.
"""
from __future__ import annotations

import json
import os

import torch

from elmo_pytorch.data import MAX_CHARS, check_file, default_cache_dir
from elmo_pytorch.runtime import CHECKPOINT_FORMAT, UserError, disk_full, is_disk_full


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


def read_options(path: str) -> dict:
    """A published options JSON -> our config values (`elmo.ELMoConfig` fields). The keys read are the ones
    bilm-tf and AllenNLP read."""
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
    (the files have none). Every dataset is checked against the shape the options imply before anything is
    converted, so a file that is truncated, lacks a dataset or belongs to other options is one error line
    naming it."""
    try:
        import h5py  # only needed here: official weights are HDF5
    except ImportError:
        raise UserError("reading official weights needs h5py: pip install h5py") from None
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
    return config, state_from_official(arrays, config)


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
