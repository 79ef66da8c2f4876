"""Standard ImageNet architectures in torch (the ``train`` extra), written here because torchvision's wheel does not
load against the local torch. Standard configurations: ResNet-50 (He et al.), DenseNet-121 (Huang et al.),
GoogLeNet (Szegedy et al., without the auxiliary heads), MobileNetV2 (Sandler et al.), SqueezeNet 1.1, ShuffleNetV2
1.0x (Ma et al.), EfficientNet-B0 (Tan & Le) and a ViT-Tiny-like transformer (patch 16, width 192, 6 blocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1, act: type[nn.Module] | None = nn.ReLU
            ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(conv_bn(cin, width), conv_bn(width, width, 3, stride),
                                  conv_bn(width, cout, act=None))
        self.short = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet121() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    c = 64
    for i, blocks in enumerate((6, 12, 24, 16)):
        for _ in range(blocks):
            layers.append(DenseLayer(c))
            c += 32
        if i < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 1000))


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r), conv_bn(c5r, c5, 3))  # torchvision's 3x3 in the "5x5" branch
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def googlenet() -> nn.Module:
    cfg = {"3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
           "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
           "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
           "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
           "5b": (832, 384, 192, 384, 48, 128, 128)}
    pool = {"3b": True, "4e": True}
    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), conv_bn(64, 64), conv_bn(64, 192, 3),
                               nn.MaxPool2d(3, 2, 1)]
    for name, args in cfg.items():
        layers.append(Inception(*args))
        if pool.get(name):
            layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1024, 1000))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, hidden, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, g=hidden, act=nn.ReLU6), conv_bn(hidden, cout, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x) if self.residual else self.body(x)
        return out


def mobilenet_v2() -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers, conv_bn(cin, 1280, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, 1000))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


def squeezenet1_1() -> nn.Module:
    def pool() -> nn.Module:
        return nn.MaxPool2d(3, 2, ceil_mode=True)
    return nn.Sequential(nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(),
                         Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192),
                         Fire(384, 64, 256), Fire(512, 64, 256), nn.Dropout(0.5), nn.Conv2d(512, 1000, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ShuffleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, stride, g=cin, act=None), conv_bn(cin, half))
        right_in = cin if stride > 1 else half
        self.right = nn.Sequential(conv_bn(right_in, half), conv_bn(half, half, 3, stride, g=half, act=None),
                                   conv_bn(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def shufflenet_v2() -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 24
    for cout, n in ((116, 4), (232, 8), (464, 4)):
        for i in range(n):
            layers.append(ShuffleBlock(cin, cout, 2 if i == 0 else 1))
            cin = cout
    return nn.Sequential(*layers, conv_bn(cin, 1024), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = conv_bn(hidden, hidden, k, stride, g=hidden, act=nn.SiLU)
        squeeze = max(1, cin // 4)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeeze, 1), nn.SiLU(),
                                nn.Conv2d(squeeze, hidden, 1), nn.Sigmoid())
        self.project = conv_bn(hidden, cout, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        h = self.project(h * self.se(h))
        out: torch.Tensor = x + h if self.residual else h
        return out


def efficientnet_b0() -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.SiLU)]
    cin = 32
    for e, k, s, c, n in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)):
        for i in range(n):
            layers.append(MBConv(cin, c, k, s if i == 0 else 1, e))
            cin = c
    return nn.Sequential(*layers, conv_bn(cin, 1280, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, 1000))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class ViT(nn.Module):
    def __init__(self, side: int = 224, patch: int = 16, dim: int = 192, depth: int = 6, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (side // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        out: torch.Tensor = self.head(self.norm(self.blocks(x))[:, 0])
        return out


class RandomNet(nn.Module):
    """A random stack of the blocks real models are made of (the corpus's block types at random widths, strides
    and input sizes): dense, depthwise and grouped convolutions, ReLU / ReLU6 / SiLU / HardSwish / GELU,
    squeeze-excitation, residual adds, concatenations, channel shuffles, pre-activation BatchNorm and an attention
    block (LayerNorm, MatMul, Softmax). Never a corpus model: what a latency model is fitted on before it predicts
    the corpus."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def pick(options: tuple[int, ...] | tuple[type[nn.Module], ...]) -> Any:
            return options[int(torch.randint(len(options), (1,), generator=g))]

        self.side = pick((32, 48, 56, 64, 96, 112))
        c = pick((8, 16, 24, 32, 48))
        act = pick((nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU))
        stride = pick((1, 2))
        self.stem = conv_bn(3, c, 3, stride, act=act)
        h = (self.side + stride - 1) // stride
        blocks: list[nn.Module] = []
        for _ in range(pick((2, 3, 4, 5))):
            kind, stride = pick((0, 1, 2, 3, 4, 5, 6)), pick((1, 1, 2)) if h >= 8 else 1
            out = pick((16, 24, 32, 48, 64, 96, 128, 160))
            if kind == 0:  # MobileNetV2's block
                blocks.append(InvertedResidual(c, out, stride, pick((1, 3, 6))))
            elif kind == 1:  # EfficientNet's: squeeze-excitation, SiLU
                blocks.append(MBConv(c, out, pick((3, 5)), stride, pick((1, 4, 6))))
            elif kind == 2:  # SqueezeNet's
                stride, out = 1, 2 * max(c // 2, 8)
                blocks.append(Fire(c, max(c // 4, 4), out // 2))
            elif kind == 3 and out % 4 == 0:  # ShuffleNetV2's: split, shuffle (Reshape, Transpose), concat
                blocks.append(ShuffleBlock(c, out, 2) if stride == 2 or c != out else ShuffleBlock(c, out, 1))
                stride = 2 if stride == 2 or c != out else 1
            elif kind == 4:  # ResNet's bottleneck
                blocks.append(Bottleneck(c, max(out // 4, 4), stride))
                out = max(out // 4, 4) * 4
            elif kind == 5:  # DenseNet's layer: pre-activation BatchNorm (not fused), concatenation
                stride, out = 1, c + 32
                blocks.append(DenseLayer(c))
            else:
                blocks.append(conv_bn(c, out, pick((1, 3, 5)), stride, g=pick((1, 1, 2)) if c % 2 == 0 == out % 2
                                      else 1, act=act))
            c, h = out, (h + stride - 1) // stride
        self.blocks = nn.Sequential(*blocks)
        # attention over a ViT-like number of tokens (about 7x7 or 14x14 of them), or none
        self.tokens = nn.AvgPool2d(max(1, h // pick((7, 14))))
        self.attend = EncoderBlock(c, pick((1, 2)) if c % 2 == 0 else 1) if pick((0, 1)) else None
        width = pick((0, 0, 512, 1024, 1280))  # MobileNet-like last 1x1 conv: a classifier of megabytes of weights
        self.last = conv_bn(c, width, act=act) if width else nn.Identity()
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(width or c, pick((10, 100, 1000)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        if self.attend is not None:
            x = self.tokens(x)
            n, c, h, w = x.shape
            x = self.attend(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        out: torch.Tensor = self.head(self.pool(self.last(x)).flatten(1))
        return out


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50, "densenet121": densenet121, "googlenet": googlenet, "mobilenet_v2": mobilenet_v2,
    "squeezenet1_1": squeezenet1_1, "shufflenet_v2": shufflenet_v2, "efficientnet_b0": efficientnet_b0,
    "vit_tiny": ViT,
}
