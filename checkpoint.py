"""The checkpoint format: one function writes it, one reads and checks it. Nothing else touches its keys.

    python checkpoint.py checkpoints/best_model.pth      # checks a checkpoint as infer.py does, prints what it holds

A checkpoint is self-describing (like nanoGPT's): the model's arguments (a click-conditioned model's click
encoding and radius among them, which predict.py encodes clicks with), the preprocessing contract
(`spec.DataSpec`: classes, palette, bands, intensity rule, scale), the training config, the metrics and
epoch, the weights, and for `last.pth` the state needed to resume. It loads with
`torch.load(..., weights_only=True)`; a file that carries code is refused. A model with non-finite weights
is never written.
"""

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import ARCHS, CLICK_INPUTS, DECODERS
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
    rng states, history, best mIoU; only in last.pth), `prior` (None, or the class prior the model predicts a map
    under: {"train": [...], "map": [...], "source": ...}; load_model applies it) and `path`."""

    model_args: dict
    spec: DataSpec
    state_dict: dict
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = None
    train_state: dict = None
    prior: dict = None
    path: Path = None


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors that hold NaN or infinity."""
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
            and not torch.isfinite(v).all()]


def save_checkpoint(path, model, spec, *, config=None, metrics=None, epoch=None, train_state=None, state_dict=None,
                    prior=None):
    """Write a checkpoint atomically. Refuses (ValueError) a model with non-finite weights. `state_dict`: weights
    held since (LastCheckpoint), instead of the model's current ones; `prior`: see Checkpoint."""
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
    if prior is not None:
        ckpt["prior"] = prior
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
        if args.get("click_channels", 0) not in (0, k) or args.get("click_channels") and (
                args.get("click_encoding") not in CLICK_INPUTS[1:] or not float(args.get("click_radius", 0)) > 0):
            raise ValueError(f"click input {args.get('click_channels')} planes, {args.get('click_encoding')!r}, radius "
                             f"{args.get('click_radius')}: a click-conditioned model takes one plane per class, "
                             f"encoded as {' or '.join(CLICK_INPUTS[1:])} with a radius > 0")
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
                      train_state=d.get("train_state"), prior=d.get("prior"),
                      path=path)


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint describes. Returns (model in eval mode on device, Checkpoint). A checkpoint
    with a `prior` predicts under it: its logits get log(map prior / training prior) added (prior_shift), so every
    map made from it (infer.py, the page, assess.py) has its class probabilities corrected to the map's prior."""
    ck = read_checkpoint(path)
    model = build_model(**ck.model_args)
    try:
        model.load_state_dict(ck.state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes ({ck.model_args}): "
                              f"{str(e).splitlines()[0]}") from None
    if ck.prior is not None:
        apply_prior(model, ck.prior)
    return model.to(device).eval(), ck


def apply_prior(model, prior):
    """Make `model` predict under `prior` (see Checkpoint): its logits get prior_shift(prior) added."""
    shift = prior_shift(prior)
    model.register_forward_hook(lambda module, inputs, logits: logits + shift.to(logits).view(1, -1, 1, 1))


def prior_shift(prior):
    """log(map / train) per class: added to the logits, a classifier trained under the `train` class prior
    predicts under the `map` one (the posterior correction of Saerens, Latinne and Decaestecker 2002)."""
    train, target = (torch.as_tensor(prior[k], dtype=torch.float64) for k in ("train", "map"))
    if train.shape != target.shape or not (torch.isfinite(train).all() and torch.isfinite(target).all()) \
            or (train <= 0).any() or (target <= 0).any():
        raise CheckpointError(f"a checkpoint's prior must hold one positive share per class, got {prior}")
    return torch.log(target / target.sum()) - torch.log(train / train.sum())


# --------------------------------------------------------------------------- what a run writes as it goes

PROGRESS_FILE = "progress.jsonl"  # in a run's folder: Progress writes it, read_progress reads it
LAST_EVERY = 300  # seconds: last.pth (188 MB with Adam's state) at most this often, plus at the end and on Ctrl-C


def _cpu_copy(state):
    """A copy of a (nested) state with every tensor on the CPU, to be written later."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


class LastCheckpoint:
    """`<out>/last.pth`, what --resume continues from, written at a bounded rate: the state after each validation
    is held in memory (`hold`, which refuses non-finite weights at once) and written when `every` seconds have
    passed since the last write, at the last epoch, and on Ctrl-C (`flush`). (Written at every validation, a run
    on the real tile wrote 10 GB.)"""

    def __init__(self, path, model, spec, config, every=None):
        self.path, self.model, self.spec, self.config = path, model, spec, config
        self.every = LAST_EVERY if every is None else every
        self.held, self.epoch, self.written = None, None, time.monotonic()
        self.prior = None  # written with the weights (see Checkpoint.prior)

    def hold(self, epoch, metrics, train_state, final=False):
        state = _cpu_copy(self.model.state_dict())
        bad = non_finite_tensors(state)
        if bad:
            raise ValueError(f"refusing to save {self.path}: {len(bad)} weight tensors hold NaN or infinity "
                             f"({', '.join(bad[:3])})")
        self.held = dict(state_dict=state, metrics=metrics, epoch=epoch, train_state=_cpu_copy(train_state))
        if final or time.monotonic() - self.written >= self.every:
            self.flush()

    def flush(self):
        """Write the held state, if any; True when last.pth holds the last validated epoch."""
        if self.held is not None:
            save_checkpoint(self.path, self.model, self.spec, config=self.config, prior=self.prior, **self.held)
            self.epoch, self.held, self.written = self.held["epoch"], None, time.monotonic()
        return self.epoch is not None


def json_ready(value):
    """JSON without NaN or infinity (null instead), which browsers and strict readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


class Progress:
    """`<out>/progress.jsonl`: how far a run is, one JSON object per line, flushed at once, for the annotation
    page, annotate_loop.py or any watcher (never the log's wording). A run starts the file afresh (--resume
    appends):
        {"event": "start", "unit": "epoch"|"step", "epochs", "steps", "per_epoch", "start_epoch", "time"}
        {"event": "validation", "epoch", "epochs", "step", "steps", "loss", "val": {the history's val_*}, "elapsed"}
        {"event": "end", "status": "done"|"failed"|"interrupted", "elapsed"}
    An "epoch" is a validation (with --steps, `per_epoch` optimizer steps)."""

    def __init__(self, path, append=False, **start):
        self.t0 = time.time()
        self.f = open(path, "a" if append else "w")
        self.write("start", **start, time=self.t0)

    def write(self, event, **fields):
        self.f.write(json.dumps(json_ready({"event": event, **fields})) + "\n")
        self.f.flush()

    def close(self, status):
        if not self.f.closed:
            self.write("end", status=status, elapsed=time.time() - self.t0)
            self.f.close()


def read_progress(path):
    """The latest run in train.py's progress file (`<out>/progress.jsonl`: one JSON object a line, "start", then
    "validation" per validation, "end"; a rerun starts afresh, --resume appends a new "start"), or None while it has
    no "start" line. {"unit": "epoch"|"step", "epoch", "epochs", "step", "steps", "loss", "val" (the last
    validation's val_* numbers), "elapsed", "status": "running"|"done"|"failed"}. A last line not yet ended by a newline
    is being written and waits for the next read; any other line that is not a JSON object raises ValueError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished
    run = None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            ev = None
        if not isinstance(ev, dict):
            raise ValueError(f"{path}, line {i}: not a JSON object: {line[:80]!r}")
        kind = ev.get("event")
        if kind == "start":
            run = {"unit": ev.get("unit", "epoch"), "epoch": 0, "epochs": ev.get("epochs"), "step": 0,
                   "steps": ev.get("steps"), "loss": None, "val": {}, "elapsed": 0.0, "status": "running"}
        elif run is None:
            continue  # lines of a run whose start is not in the file
        elif kind == "validation":
            run.update({k: ev[k] for k in ("epoch", "epochs", "step", "steps", "loss", "elapsed") if k in ev},
                       val=ev.get("val") or {})
        elif kind == "end":
            run.update(status=ev.get("status", "done"), elapsed=ev.get("elapsed", run["elapsed"]))
    return run


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
    if ck.prior is not None:
        names = ck.spec.classes.names
        print("predicts under the prior " + ", ".join(f"{n} {p:.1%}" for n, p in zip(names, ck.prior["map"]))
              + " (trained under " + ", ".join(f"{n} {p:.1%}" for n, p in zip(names, ck.prior["train"]))
              + f"; {ck.prior.get('source', '')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
