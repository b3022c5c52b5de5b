"""The checkpoint format: one function writes it, one reads and checks it. Nothing else touches its keys.

    python checkpoint.py checkpoints/best_model.pth      # checks a checkpoint as infer.py does, prints what it holds

A checkpoint is self-describing (like nanoGPT's): the model's arguments, the preprocessing contract
(`spec.DataSpec`: classes, palette, bands, intensity rule, scale), the training config, the metrics and
epoch, the weights, and for `last.pth` the state needed to resume. It loads with
`torch.load(..., weights_only=True)`; a file that carries code is refused. A model with non-finite weights
is never written.
"""

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import ARCHS, DECODERS
from model import build_model
from raster import atomic_path
from spec import DataSpec

FORMAT = "pointseg-checkpoint"
VERSION = 2  # 1: classes / scale / bands at the top level, 8-bit intensity only


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names it and says what is wrong."""


@dataclass
class Checkpoint:
    """A checkpoint as read: `model_args` for `model.build_model`, `spec` (DataSpec), `config` (training
    config dict), `metrics` (val metrics of `epoch`), `state_dict`, `train_state` (optimizer, scheduler,
    rng states, history, best mIoU; only in last.pth) and `path`."""

    model_args: dict
    spec: DataSpec
    state_dict: dict
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = None
    train_state: dict = None
    path: Path = None


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors that hold NaN or infinity."""
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
            and not torch.isfinite(v).all()]


def save_checkpoint(path, model, spec, *, config=None, metrics=None, epoch=None, train_state=None, state_dict=None):
    """Write a checkpoint atomically. Refuses (ValueError) a model with non-finite weights. `state_dict`: weights
    held since (train.LastCheckpoint), instead of the model's current ones."""
    if not isinstance(spec, DataSpec):
        raise TypeError(f"spec must be a DataSpec, got {type(spec).__name__}")
    state = {k: v.detach().cpu() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"refusing to save {path}: {len(bad)} weight tensors hold NaN or infinity "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    ckpt = {"format": FORMAT, "version": VERSION, "model_args": dict(model.model_args), "spec": spec.to_dict(),
            "config": config or {}, "metrics": metrics or {}, "epoch": epoch, "state_dict": state}
    if train_state is not None:
        ckpt["train_state"] = train_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return ckpt


def _from_v1(d):
    """A version-1 checkpoint's header as a version-2 one (8-bit intensity rule, as v1 trained)."""
    args = d["model_args"]
    bands = d.get("bands")
    spec = {"classes": d["classes"], "bands": bands, "channels": int(args.get("in_channels", 3)),
            "intensity": {"kind": "uint8"}, "scale": d["scale"]}
    return dict(d, spec=spec, epoch=d.get("epoch"), train_state={k: d[k] for k in (
        "optimizer", "scheduler", "rng", "loader_rng", "history", "best_miou") if k in d} or None)


def read_checkpoint(path, map_location="cpu"):
    """Load and check a checkpoint. Raises FileNotFoundError or CheckpointError with what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found. Train one first: python train.py --data DIR "
                                f"(or make demo), or pass --checkpoint PATH")
    try:
        d = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds Python objects (code) besides tensors and was refused: "
                                  f"a checkpoint of this project holds data only. Use a file written by "
                                  f"train.py") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no '{FORMAT}' header); "
                              f"train one with python train.py")
    version = d.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this code reads 1..{VERSION} "
                              f"(update the code for a newer one)")
    try:
        if version == 1:
            d = _from_v1(d)
        args = d["model_args"]
        spec = DataSpec.from_dict(d["spec"])
        state = d["state_dict"]
        if not isinstance(args, dict) or not isinstance(state, dict):
            raise TypeError("model_args and state_dict must be dicts")
        args = {"arch": "resnet18", **args}
        if args["arch"] not in ARCHS or args.get("decoder", "plain") not in DECODERS:
            raise ValueError(f"unknown model {args}")
        k, c = int(args["num_classes"]), int(args.get("in_channels", 3))
        if k != spec.classes.num_classes:
            raise ValueError(f"the model has {k} outputs but the class list names {spec.classes.num_classes} "
                             f"classes {list(spec.classes.names)}")
        if c != spec.channels:
            raise ValueError(f"the model takes {c} bands but the preprocessing gives {spec.channels}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint header ({type(e).__name__}: {e}); "
                              f"it cannot be used, train or export it again") from None
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN or infinity ({', '.join(bad[:3])}); "
                              f"the model is broken, train it again")
    metrics = d.get("metrics") or {}
    return Checkpoint(model_args=args, spec=spec, state_dict=state, config=d.get("config") or {},
                      metrics=metrics, epoch=d["epoch"] if d.get("epoch") is not None else metrics.get("epoch"),
                      train_state=d.get("train_state"),
                      path=path)


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint describes. Returns (model in eval mode on device, Checkpoint)."""
    ck = read_checkpoint(path)
    model = build_model(**ck.model_args)
    try:
        model.load_state_dict(ck.state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes ({ck.model_args}): "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ck


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Describe a checkpoint: model, preprocessing, metrics.")
    p.add_argument("checkpoint")
    return p


def main(args):
    try:
        _, ck = load_model(args.checkpoint)  # the check infer.py makes: the weights must build the model
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in ck.state_dict.values() if torch.is_tensor(v))
    print(f"{ck.path}: {ck.model_args}, {n / 1e6:.2f} M values, epoch {ck.epoch}")
    print(f"classes: {list(ck.spec.classes.names)}; bands {ck.spec.bands}, {ck.spec.channels} channels; "
          f"intensity {ck.spec.intensity.to_dict()}; scale {ck.spec.scale:g}")
    m = ck.metrics
    if m.get("miou") is not None and math.isfinite(m["miou"]):
        print(f"val mIoU {m['miou']:.3f}, OA {m.get('oa', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
