"""ResNet18 encoder + transposed-convolution decoder (and a tiny stand-in for tests); the format that
stores them is checkpoint.py.

    python train.py --decoder skip --arch resnet18      # what trains it; --arch tiny for smoke runs
    python train.py --click-input disc ...              # a click-conditioned model (add_click_input)

The model takes images in [0, 1] (B, H, W) of any size and normalises them itself (ImageNet mean/std), so
training and inference cannot disagree. `decoder="plain"` is the published decoder (transposed-conv
upsampling, no skips); `decoder="skip"` adds skip connections from the encoder stages.

A click-conditioned model (DISIR, Lenczner et al. 2020) takes one more input plane per class after the image
bands: a person's clicks, encoded by `click_planes` (a disc, or a truncated distance map, around each click in its
class's plane). Given the bands alone it adds empty planes and predicts the no-click map, so every caller that
knows nothing of clicks works unchanged. It trains from points alone (`draw_clicks`, `ClickDraw`): in each batch
some of an image's labelled points go in as clicks and the loss counts the others.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from config import ARCHS, CLICK_INPUTS, DECODERS  # the choices are declared with the settings
from spec import IGNORE_INDEX

# --------------------------------------------------------------------------- constants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_WEIGHTS_FILE = "resnet18-f37072fd.pth"  # what torchvision's IMAGENET1K_V1 downloads


# --------------------------------------------------------------------------- building blocks

def up_block(in_ch, out_ch):
    """x2 upsampling by a transposed convolution, then BN + ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def conv_block(in_ch, out_ch):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def imagenet_resnet18(pretrained):
    """torchvision resnet18, with ImageNet weights if asked. Offline, asking fails with what to do."""
    if not pretrained:
        return torchvision.models.resnet18(weights=None)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_WEIGHTS_FILE
    try:
        return torchvision.models.resnet18(weights=weights)
    except Exception as e:  # URLError, OSError, HTTP errors: all mean "could not get the file"
        raise RuntimeError(
            f"could not load the ImageNet weights {RESNET18_WEIGHTS_FILE} ({type(e).__name__}: {e}). "
            f"torch looks for them at {cached} (set TORCH_HOME to change where) and downloads them when "
            f"online. Copy the file there, or train from scratch with pretrained=False "
            f"(train.py --no-pretrained).") from None


class ClickInput:
    """What both networks share for click input (add_click_input): `click_channels` planes after the image bands
    (0: none), how clicks become planes (`click_encoding`, `click_radius`: see click_planes), and the split of an
    input into bands and planes."""

    click_channels, click_encoding, click_radius = 0, None, None

    def click_args(self):
        """The click settings for model_args (none for a model without click input: its args stay as they were)."""
        return {"click_channels": self.click_channels, "click_encoding": self.click_encoding,
                "click_radius": self.click_radius} if self.click_channels else {}

    def split_input(self, x):
        """(image bands, click planes or None) of an input (B, bands [+ click planes], H, W). A click-conditioned model
        given the bands alone gets empty planes: the no-click map."""
        if not self.click_channels:
            return x, None
        c = self.in_channels
        if x.shape[1] == c:
            return x, x.new_zeros((x.shape[0], self.click_channels) + x.shape[2:])
        if x.shape[1] != c + self.click_channels:
            raise ValueError(f"the model takes {c} bands and {self.click_channels} click planes (or the bands alone), "
                             f"got {x.shape[1]} input channels")
        return x[:, :c], x[:, c:]


class ResNet18Segmentation(ClickInput, nn.Module):
    """ResNet18 encoder + transposed-conv decoder.

    Args:
        num_classes: output channels.
        pretrained: ImageNet encoder weights through torchvision (needs the weights file or internet).
        decoder: "plain" (published: upsampling only) or "skip" (with encoder skip connections).
        in_channels: input bands; extra bands beyond RGB get a first-conv filter initialised from the mean
            of the RGB filters, and are normalised with the mean of the ImageNet statistics.

    Input (B, in_channels, H, W) in [0, 1], any H, W; output logits (B, num_classes, H, W). With click input
    (add_click_input) the click planes may follow the bands: (B, in_channels + num_classes, H, W).
    """

    def __init__(self, num_classes=6, pretrained=False, decoder="plain", in_channels=3):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; use one of {DECODERS}")
        self.num_classes, self.decoder_kind, self.in_channels = num_classes, decoder, in_channels
        mean = list(IMAGENET_MEAN[:in_channels]) + [sum(IMAGENET_MEAN) / 3] * max(0, in_channels - 3)
        std = list(IMAGENET_STD[:in_channels]) + [sum(IMAGENET_STD) / 3] * max(0, in_channels - 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        r = imagenet_resnet18(pretrained)
        if in_channels != 3:
            old = r.conv1.weight.data
            conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            extra = old.mean(1, keepdim=True).repeat(1, max(0, in_channels - 3), 1, 1)
            conv1.weight.data = torch.cat([old, extra], 1)[:, :in_channels].clone()
            r.conv1 = conv1
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)  # /2, 64
        self.pool = r.maxpool  # /4
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

        # five x2 transposed-conv steps: /32 -> /1
        self.up = nn.ModuleList([up_block(512, 256), up_block(256, 128), up_block(128, 64),
                                 up_block(64, 64), up_block(64, 32)])
        if decoder == "skip":  # after each of the first four steps, fuse the encoder stage of that size
            self.fuse = nn.ModuleList([conv_block(256 + 256, 256), conv_block(128 + 128, 128),
                                       conv_block(64 + 64, 64), conv_block(64 + 64, 64)])
        self.head = nn.Conv2d(32, num_classes, 1)

    @property
    def model_args(self):
        """What build_model needs to rebuild this model (stored in checkpoints)."""
        return {"arch": "resnet18", "num_classes": self.num_classes, "decoder": self.decoder_kind,
                "in_channels": self.in_channels, **self.click_args()}

    @property
    def output_layer(self):
        """Name prefix of the final 1x1 convolution in the state dict: the one part whose shape depends on
        num_classes (pretrain.py keeps everything else)."""
        return "head"

    input_layer = "stem.0"  # the first convolution (add_click_input widens it)

    def forward(self, x):
        H, W = x.shape[-2:]
        x, planes = self.split_input(x)
        x = (x - self.mean) / self.std
        if planes is not None:  # click planes as they are: not image statistics
            x = torch.cat([x, planes], 1)
        ph, pw = (-H) % 32, (-W) % 32
        if ph or pw:  # pad with zeros after normalisation (= the mean colour), crop back below
            x = F.pad(x, (0, pw, 0, ph))
        s1 = self.stem(x)
        s2 = self.layer1(self.pool(s1))
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        y = self.layer4(s4)
        if self.decoder_kind == "plain":
            for up in self.up:
                y = up(y)
        else:
            for up, fuse, skip in zip(self.up, self.fuse, (s4, s3, s2, s1)):
                y = fuse(torch.cat([up(y), skip], 1))
            y = self.up[-1](y)
        return self.head(y)[..., :H, :W]


# --------------------------------------------------------------------------- a tiny stand-in and the factory

class TinySegmentation(ClickInput, nn.Module):
    """Three convolutions at full resolution: a stand-in for tests and smoke runs where the test is not about
    the network (trains in a fraction of ResNet18's time). Same input and output contract."""

    def __init__(self, num_classes=6, in_channels=3, width=16):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.net = nn.Sequential(conv_block(in_channels, width), conv_block(width, width),
                                 nn.Conv2d(width, num_classes, 1))

    @property
    def model_args(self):
        return {"arch": "tiny", "num_classes": self.num_classes, "in_channels": self.in_channels, **self.click_args()}

    @property
    def output_layer(self):
        return "net.2"

    input_layer = "net.0.0"

    def forward(self, x):
        x, planes = self.split_input(x)
        return self.net(x * 2 - 1 if planes is None else torch.cat([x * 2 - 1, planes], 1))


def build_model(arch="resnet18", num_classes=6, in_channels=3, decoder="skip", pretrained=False, click_channels=0,
                click_encoding="disc", click_radius=3.0):
    """The model `model_args` describe (checkpoint.py stores them): ResNet18Segmentation or the tiny one, with
    click input when `click_channels` (= num_classes; 0: none, as in every checkpoint from before it)."""
    if arch == "tiny":
        model = TinySegmentation(num_classes, in_channels)
    elif arch != "resnet18":
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    else:
        model = ResNet18Segmentation(num_classes, pretrained=pretrained, decoder=decoder, in_channels=in_channels)
    if click_channels:
        if click_channels != num_classes:
            raise ValueError(f"a click-conditioned model takes one click plane per class ({num_classes}), "
                             f"got click_channels={click_channels}")
        add_click_input(model, click_encoding, click_radius)
    return model


# --------------------------------------------------------------------------- clicks as input planes (DISIR)

def add_click_input(model, encoding, radius):
    """Condition `model` on clicks, in place (DISIR, Lenczner et al. 2020): its first convolution takes one more
    input plane per class after the image bands, with filters that start at zero, so that without clicks it
    computes exactly what it computed before (ImageNet, --encoder or adapted weights unchanged). `encoding`, `radius`:
    how clicks become planes (click_planes); "none" leaves the model as it is. Returns the model. Draws no random
    number."""
    if encoding == "none":
        return model
    if encoding not in CLICK_INPUTS[1:] or not radius > 0:
        raise ValueError(f"click input {encoding!r} radius {radius!r}: use one of {CLICK_INPUTS[1:]} and a radius > 0")
    if model.click_channels:
        raise ValueError("the model takes clicks already")
    old = model.get_submodule(model.input_layer)
    new = nn.Conv2d(old.in_channels + model.num_classes, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None, device="meta")  # meta: no init (and no random number) to overwrite
    zeros = old.weight.new_zeros((old.out_channels, model.num_classes) + tuple(old.kernel_size))
    new.weight = nn.Parameter(torch.cat([old.weight.detach(), zeros], 1))
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone())
    model.set_submodule(model.input_layer, new)
    model.click_channels, model.click_encoding, model.click_radius = model.num_classes, encoding, float(radius)
    return model


def stamp_planes(plane, rows, cols, n_planes, shape, encoding="disc", radius=3.0):
    """(n_planes, H, W) float32 planes with each click stamped into its plane (the maximum where stamps overlap):
    disc: 1 within `radius` pixels; distance: max(0, 1 - d / radius). `plane`, `rows`, `cols`: (N,) int64 tensors,
    on the device the planes are made on. Only the (2r + 1)^2 window around each click is computed."""
    H, W = shape
    out = torch.zeros(n_planes * H * W, device=rows.device)
    if rows.numel() == 0:
        return out.view(n_planes, H, W)
    r = int(math.floor(radius))
    off = torch.arange(-r, r + 1, device=rows.device)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(off, off, indexing="ij"))
    d = torch.sqrt((dy * dy + dx * dx).float())
    value = (d <= radius).float() if encoding == "disc" else (1 - d / radius).clamp(min=0)
    keep = value > 0
    dy, dx, value = dy[keep], dx[keep], value[keep]
    rr, cc = rows[:, None] + dy, cols[:, None] + dx
    inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
    index = (plane[:, None] * H + rr) * W + cc
    out.scatter_reduce_(0, index[inside], value.expand_as(rr)[inside], "amax")
    return out.view(n_planes, H, W)


def click_planes(clicks, shape, num_classes, encoding="disc", radius=3.0, device=None):
    """Clicks as a (num_classes, H, W) float32 tensor, one plane per class: `clicks` (N, 3) of row, column and class
    index on an (H, W) grid (list, array or tensor). disc: 1 within `radius` pixels of a click of the plane's class;
    distance: the truncated distance map max(0, 1 - d / radius), d the distance to the nearest click of that class
    (DISIR). A click off the grid or of an unknown class is an error."""
    if encoding not in CLICK_INPUTS[1:]:
        raise ValueError(f"unknown click encoding {encoding!r}; use one of {CLICK_INPUTS[1:]}")
    c = torch.as_tensor(np.asarray(clicks, dtype=np.int64).reshape(-1, 3), device=device)
    H, W = shape
    bad = (c[:, 0] < 0) | (c[:, 0] >= H) | (c[:, 1] < 0) | (c[:, 1] >= W) | (c[:, 2] < 0) | (c[:, 2] >= num_classes)
    if bad.any():
        raise ValueError(f"click (row, col, class) {c[bad][0].tolist()} is off the {H}x{W} grid or of no class "
                         f"0..{num_classes - 1}")
    return stamp_planes(c[:, 2], c[:, 0], c[:, 1], num_classes, shape, encoding, radius)


def draw_clicks(y, num_classes, generator, max_clicks=10, p_none=0.5, encoding="disc", radius=3.0):
    """Input clicks for a training batch, drawn from its labelled points: (planes (B, K, H, W) float32, target
    (B, H, W) with the clicked pixels set to IGNORE_INDEX), so the loss counts the other points only. `y`: (B, H, W)
    class indices, IGNORE_INDEX where unlabelled. Per image: no clicks with probability `p_none` (the no-click map
    trains too), else k uniform in 1..min(max_clicks, n - 1) of its n labelled pixels, so at least one point stays
    in the loss (an image with fewer than 2 gets none). Every draw comes from `generator` (a CPU torch.Generator, or
    None: torch's global one): the same state gives the same clicks."""
    B, H, W = y.shape
    target = y.reshape(B, -1).clone()
    planes, flat = [], []
    for b in range(B):
        if float(torch.rand((), generator=generator)) < p_none:
            continue
        labelled = torch.nonzero(target[b] != IGNORE_INDEX).squeeze(1)
        top = min(max_clicks, labelled.numel() - 1)
        if top < 1:
            continue
        k = int(torch.randint(1, top + 1, (), generator=generator))
        chosen = labelled[torch.randperm(labelled.numel(), generator=generator)[:k].to(labelled.device)]
        planes.append(b * num_classes + target[b, chosen].long())
        flat.append(chosen)
        target[b, chosen] = IGNORE_INDEX
    flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64, device=y.device)
    plane = torch.cat(planes) if planes else flat
    out = stamp_planes(plane, flat // W, flat % W, B * num_classes, (H, W), encoding, radius)
    return out.view(B, num_classes, H, W), target.view(B, H, W)


class ClickDraw:
    """The input clicks of a click-conditioned model's training batches (train.py --click-input): called on a batch's
    images (B, bands, H, W) and points (B, H, W), returns (the images with their click planes appended, the points
    not clicked), by draw_clicks. Draws from `generator`, by default torch's global one, which train.py seeds
    (--seed) and keeps in last.pth, so a resumed run draws the clicks an unbroken one draws."""

    def __init__(self, model, max_clicks, p_none, generator=None):
        self.num_classes, self.encoding, self.radius = model.num_classes, model.click_encoding, model.click_radius
        self.max_clicks, self.p_none, self.generator = max_clicks, p_none, generator

    def __call__(self, x, y):
        planes, target = draw_clicks(y, self.num_classes, self.generator, self.max_clicks, self.p_none,
                                     self.encoding, self.radius)
        return torch.cat([x, planes.to(x.dtype)], 1), target


def condition_on_clicks(model, encoding, radius, max_clicks, p_none):
    """train.py --click-input: make `model` click-conditioned (add_click_input) and return the ClickDraw of its
    training batches; None for encoding "none": the model untouched and no random number drawn, ever."""
    if encoding == "none":
        return None
    add_click_input(model, encoding, radius)
    return ClickDraw(model, max_clicks, p_none)


def resolve_device(name="auto"):
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
