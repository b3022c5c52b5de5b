"""ResNet18 encoder + transposed-convolution decoder (and a tiny stand-in for tests); the format that
stores them is checkpoint.py.

    python train.py --decoder skip --arch resnet18      # what trains it; --arch tiny for smoke runs

The model takes images in [0, 1] (B, H, W) of any size and normalises them itself (ImageNet mean/std), so
training and inference cannot disagree. `decoder="plain"` is the published decoder (transposed-conv
upsampling, no skips); `decoder="skip"` adds skip connections from the encoder stages.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from config import ARCHS, DECODERS  # the choices are declared with the settings

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


class ResNet18Segmentation(nn.Module):
    """ResNet18 encoder + transposed-conv decoder.

    Args:
        num_classes: output channels.
        pretrained: ImageNet encoder weights through torchvision (needs the weights file or internet).
        decoder: "plain" (published: upsampling only) or "skip" (with encoder skip connections).
        in_channels: input bands; extra bands beyond RGB get a first-conv filter initialised from the mean
            of the RGB filters, and are normalised with the mean of the ImageNet statistics.

    Input (B, in_channels, H, W) in [0, 1], any H, W; output logits (B, num_classes, H, W).
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
                "in_channels": self.in_channels}

    @property
    def output_layer(self):
        """Name prefix of the final 1x1 convolution in the state dict: the one part whose shape depends on
        num_classes (pretrain.py keeps everything else)."""
        return "head"

    def forward(self, x):
        H, W = x.shape[-2:]
        x = (x - self.mean) / self.std
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

class TinySegmentation(nn.Module):
    """Three convolutions at full resolution: a stand-in for tests and smoke runs where the test is not about
    the network (trains in a fraction of ResNet18's time). Same input and output contract."""

    def __init__(self, num_classes=6, in_channels=3, width=16):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.net = nn.Sequential(conv_block(in_channels, width), conv_block(width, width),
                                 nn.Conv2d(width, num_classes, 1))

    @property
    def model_args(self):
        return {"arch": "tiny", "num_classes": self.num_classes, "in_channels": self.in_channels}

    @property
    def output_layer(self):
        return "net.2"

    def forward(self, x):
        return self.net(x * 2 - 1)


def build_model(arch="resnet18", num_classes=6, in_channels=3, decoder="skip", pretrained=False):
    """The model `model_args` describe (checkpoint.py stores them): ResNet18Segmentation or the tiny one."""
    if arch == "tiny":
        return TinySegmentation(num_classes, in_channels)
    if arch != "resnet18":
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    return ResNet18Segmentation(num_classes, pretrained=pretrained, decoder=decoder, in_channels=in_channels)


def resolve_device(name="auto"):
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
