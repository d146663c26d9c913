"""Checkpoints written by the published code (REPA, LSEP, SRA, SiT) as lsep_tune SiT weights.

The backbone is the same network in all of them; what differs is around it:

- `pos_embed` is a saved (frozen) parameter there and a recomputed buffer here: it is checked
  against the sin-cos table of the configured grid and dropped.
- each paper's extra head has its own name: LSEP's probe `classifier.*`, SRA's `ap_head.*`
  (linear1 / linear2), REPA's `projectors.*`. They are left out of the SiT weights; LSEP's probe and
  SRA's head map onto lsep_tune's heads for fine-tuning (`heads`).
- SiT's own code (willisma/SiT) learns sigma by default, so its last layer is twice as wide (the
  first half of the channels is the velocity), and runs time the other way: t = 0 is noise and
  the velocity is x_data - x_noise. Both are folded into the weights, so the result is a plain
  lsep_tune SiT: the time flip t -> 1 - t is a fixed linear map of the sinusoidal time features
  (absorbed into the first time-MLP layer) and the sign flip goes into the last layer.

Files may hold the weights under `ema`, `model` or at the top level (`ema` is preferred). A
layout that does not fit fails in one line naming the keys that did not fit.
"""
from __future__ import annotations

import argparse
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lsep_tune.models.names import model_names
from lsep_tune.models.sit import create_model, sincos_pos_embed_2d
from lsep_tune.errors import InputError

FORMATS = ("lsep_tune", "lsep", "sra", "repa", "sit")
# Heads of the published models that are not part of the SiT backbone.
HEAD_PREFIXES = {"lsep": ("classifier.",), "sra": ("ap_head.",), "repa": ("projectors.",), "sit": ()}
# Published head key prefix -> lsep_tune TrainObjective key prefix (same shapes).
HEAD_NAMES = {
    "lsep": {"classifier.": "regularizers.lsep.probe."},
    "sra": {"ap_head.linear1.": "regularizers.sra.head.fc1.", "ap_head.linear2.": "regularizers.sra.head.fc2."},
}
_SHOWN = 4  # keys named in an error before "+N more"


class PublishedError(InputError):
    """A checkpoint that cannot be read or does not fit: ``<file>: <field>: <expectation>``."""


@dataclass
class Converted:
    """SiT weights in lsep_tune's layout and conventions, the model they fit, and any known heads."""

    model: dict[str, Any]  # ModelConfig fields
    sit: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]  # TrainObjective keys, e.g. regularizers.lsep.probe.1.weight
    step: int | None = None
    config: dict[str, Any] | None = None  # the whole stored config (lsep_tune files only)


def _gist(err: BaseException) -> str:
    """The gist of a torch.load failure: torch's messages run to paragraphs of advice whose one
    useful line names what the safe unpickler refused."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    line = line.removeprefix("WeightsUnpickler error: ") if line else (lines[0] if lines else type(err).__name__)
    line = re.split(r"(?<=[.?!])\s", line, maxsplit=1)[0]  # its first sentence
    return line if len(line) <= 100 else line[:97] + "..."


def read_file(file, source: str, allow: tuple = (), error: type[InputError] = InputError) -> Any:
    """torch.load with weights_only=True (plus the `allow`ed classes), for any checkpoint file, ours or
    a published one: a file that is not one fails as a short `error` line, without torch's warnings."""
    if not zipfile.is_zipfile(file):
        raise error(source, "file", "not a torch checkpoint (torch.save writes a zip archive; this is none)")
    if hasattr(file, "seek"):
        file.seek(0)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            warnings.simplefilter("ignore")  # torch warns before it fails; the one-line error says it all
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        raise error(source, "file", f"not a readable torch checkpoint ({_gist(err)})") from None


def read(file: str | Path | BinaryIO, source: str | None = None) -> dict[str, Any]:
    """torch.load with weights_only=True; the published scripts also pickle an argparse.Namespace."""
    source = source or str(file)
    blob = read_file(file, source, allow=(argparse.Namespace,), error=PublishedError)
    if not isinstance(blob, dict):
        raise PublishedError(source, "file", f"expected a dict of weights, got {type(blob).__name__}")
    return blob


def _tensors(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def weights_of(blob: dict[str, Any], fmt: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under 'ema', else 'model', else the top level."""
    for key in ("ema", "model"):
        if _tensors(blob.get(key)):
            weights = dict(blob[key])
            break
    else:
        if not _tensors(blob):
            raise PublishedError(source, fmt, "no weights found under 'ema', 'model' or at the top level "
                                              f"(keys: {', '.join(sorted(map(str, blob))[:8])})")
        weights = dict(blob)
    if fmt == "lsep_tune" and any(k.startswith("sit.") for k in weights):  # state.pt: the whole objective
        return {k: v for k, v in weights.items() if k.startswith(("sit.", "regularizers."))}
    return weights


def model_settings(blob: dict[str, Any], fmt: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture: what the file says (stored config or the published args), then `given`."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if fmt == "lsep_tune":
        stored = (blob.get("config") or {}).get("model")
        return {**given, **stored} if isinstance(stored, dict) else given
    args = blob.get("args")
    said: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        if getattr(args, "model", None) in model_names():
            said["name"] = args.model
        pixels = getattr(args, "resolution", None) or getattr(args, "image_size", None)
        if isinstance(pixels, int):
            said["input_size"] = pixels // 8  # the SD-VAE's factor, as in every published script
        if isinstance(getattr(args, "num_classes", None), int):
            said["num_classes"] = args.num_classes
        if isinstance(getattr(args, "qk_norm", None), bool):
            said["qk_norm"] = args.qk_norm
    return {**given, **said}


def time_flip(freq_dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """R with features(1 - t) = R @ features(t) for the [cos(f t), sin(f t)] time features.

    cos(f - f t) = cos f cos f t + sin f sin f t and sin(f - f t) = sin f cos f t - cos f sin f t.
    """
    half = freq_dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    c, s = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    r = torch.zeros(freq_dim, freq_dim, dtype=torch.float64)
    r[:half, :half], r[:half, half:2 * half] = c, s
    r[half:2 * half, :half], r[half:2 * half, half:2 * half] = s, -c
    if freq_dim % 2:
        r[-1, -1] = 1.0  # the zero pad feature stays zero
    return r


def _first_half_channels(t: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Rows of a (p*p*2C, ...) output layer that produce the first C channels (channel varies fastest)."""
    rest = t.shape[1:]
    return t.reshape(patch, patch, 2 * channels, *rest)[:, :, :channels].reshape(patch * patch * channels, *rest)


def _sit_conventions(state: dict[str, torch.Tensor], patch: int, channels: int) -> dict[str, torch.Tensor]:
    """willisma/SiT -> lsep_tune: drop the sigma half, run time the other way, flip the velocity."""
    out = dict(state)
    w, b = out.get("final_layer.linear.weight"), out.get("final_layer.linear.bias")
    if w is not None and b is not None:
        if w.shape[0] == 2 * patch * patch * channels:  # learn_sigma=True, the default there
            w, b = _first_half_channels(w, patch, channels), _first_half_channels(b, patch, channels)
        out["final_layer.linear.weight"], out["final_layer.linear.bias"] = -w, -b
    w0 = out.get("t_embedder.mlp.0.weight")
    if w0 is not None:
        out["t_embedder.mlp.0.weight"] = (w0.double() @ time_flip(w0.shape[1])).to(w0.dtype)
    return out


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def convert(weights: dict[str, torch.Tensor], fmt: str, model: dict[str, Any], source: str = "checkpoint"
            ) -> dict[str, torch.Tensor]:
    """Backbone weights of a published layout -> a state dict that `create_model(**model)` loads."""
    if fmt not in FORMATS:
        raise PublishedError(source, "format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    name = model.get("name", "SiT-XL/2")
    kwargs = {k: model[k] for k in ("input_size", "in_channels", "num_classes", "qk_norm") if k in model}
    with torch.device("meta"):
        sit = create_model(name, **kwargs)
    expected = sit.state_dict()
    if fmt == "lsep_tune":
        state = {k.removeprefix("sit."): v for k, v in weights.items() if not k.startswith("regularizers.")}
    else:
        heads = HEAD_PREFIXES[fmt]
        state = {k: v for k, v in weights.items() if not k.startswith(heads)}
        pos = state.pop("pos_embed", None)
        if fmt == "sit":
            state = _sit_conventions(state, sit.patch_size, sit.in_channels)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    problems = [f"{label} {_names(keys)}" for label, keys in
                (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong)) if keys]
    if problems:
        raise PublishedError(source, fmt, f"keys do not fit {name} (input {sit.input_size}, {sit.in_channels} "
                             f"channels, {sit.num_classes} classes): " + "; ".join(problems))
    if fmt != "lsep_tune" and pos is not None:  # checked once the keys fit: a wrong model says so first
        table = torch.from_numpy(sincos_pos_embed_2d(sit.hidden_size, sit.grid_size)).float().unsqueeze(0)
        if tuple(pos.shape) != tuple(table.shape) or not torch.allclose(pos.float(), table, atol=1e-4):
            raise PublishedError(source, "pos_embed", f"not the fixed sin-cos table of {name}'s "
                                 f"{sit.grid_size}x{sit.grid_size} grid (shape {tuple(pos.shape)})")
    return {k: state[k].detach().clone().contiguous() for k in expected}


def heads(weights: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The published LSEP probe / SRA head under lsep_tune's TrainObjective names."""
    if fmt == "lsep_tune":
        return {k: v for k, v in weights.items() if k.startswith("regularizers.")}
    out = {}
    for old, new in HEAD_NAMES.get(fmt, {}).items():
        out.update({new + k[len(old):]: v for k, v in weights.items() if k.startswith(old)})
    return out


def load(file: str | Path | BinaryIO, fmt: str, model: dict[str, Any] | None = None,
         source: str | None = None) -> Converted:
    """Read a checkpoint of layout `fmt`; `model` fills in what the file does not say."""
    source = source or str(file)
    if fmt not in FORMATS:
        raise PublishedError(source, "format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    blob = read(file, source)
    weights = weights_of(blob, fmt, source)
    settings = model_settings(blob, fmt, model)
    if settings.get("name", "SiT-XL/2") not in model_names():
        raise PublishedError(source, "model", f"unknown model {settings['name']!r}")
    sit = convert(weights, fmt, settings, source)
    step = blob.get("steps", blob.get("step"))
    config = blob.get("config") if fmt == "lsep_tune" and isinstance(blob.get("config"), dict) else None
    return Converted(settings, sit, heads(weights, fmt), int(step) if isinstance(step, int) else None, config)
