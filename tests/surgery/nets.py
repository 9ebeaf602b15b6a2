"""Small custom models for the surgery tests (importable as ``tests.surgery.nets.<Name>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu-conv-linear, the linear reading the flattened 4x4 map (16 features per channel)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(6 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class SmallNet(nn.Module):
    """Residual add, concatenation, depthwise conv, a 1-output-channel conv and a grouped conv."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1, bias=False)
        self.b_bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.dw_bn = nn.BatchNorm2d(14)
        self.gate = nn.Conv2d(14, 1, 1)  # one output channel: not depthwise
        self.e = nn.Conv2d(14, 8, 1, bias=False)
        self.e_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.grouped_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(14 + 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem_bn(self.stem(x)))
        r = torch.relu(self.a_bn(self.a(s)) + s)
        c = torch.cat([r, torch.relu(self.b_bn(self.b(r)))], dim=1)
        d = torch.relu(self.dw_bn(self.dw(c)))
        d = d * torch.sigmoid(self.gate(d))
        e = torch.relu(self.e_bn(self.e(d)))
        g = torch.relu(self.grouped_bn(self.grouped(e)))
        return self.fc(torch.cat([d.mean((2, 3)), g.mean((2, 3))], dim=1))


class Untraceable(nn.Module):
    """A block with data-dependent control flow inside an otherwise traceable model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 4, 1)
        self.block = _Branchy()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.block(self.conv(x)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class RootBranch(nn.Module):
    """Branches on its input's rank in its own forward (a grayscale batch without channels)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(self.prepare(x))))
        return self.fc(x.mean((2, 3)))


class _Prepare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x


class BranchInSubmodule(RootBranch):
    """:class:`RootBranch` with the branch moved into a submodule, as the error advises."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__(num_classes)
        self.prep = _Prepare()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.prep(x)


class PadToSkip(nn.Module):
    """Down, up, and resize to the skip's size when they differ (odd inputs), then add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.a(x))
        y = nn.functional.interpolate(torch.relu(self.b(skip)), scale_factor=2)
        if y.shape[-2:] != skip.shape[-2:]:  # a U-Net's fix for odd sizes
            h, w = skip.shape[-2:]
            y = nn.functional.interpolate(y, size=(h, w))
        return self.head(y + skip)


class ValueBranch(nn.Module):
    """Branches on a tensor's values: no input shape makes that traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.mean() > 0 else -y


class IterShape(nn.Module):
    """Iterates over a shape (not tuple unpacking, which fx handles itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if [d for d in x.shape[-2:]] != [8, 8]:
            x = nn.functional.interpolate(x, size=(8, 8))
        return self.head(torch.relu(self.conv(x)))


class _Double(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    """Upsample (transposed conv, or bilinear), pad to the skip's size, concatenate, convolve."""

    def __init__(self, cin: int, cout: int, bilinear: bool) -> None:
        super().__init__()
        self.up: nn.Module = (
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            if bilinear
            else nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        )
        self.conv = _Double(cin + cin // 2 if bilinear else cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy = skip.size()[2] - x.size()[2]
        dx = skip.size()[3] - x.size()[3]
        x = nn.functional.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """A small U-Net as people write it: padding computed from sizes, transposed convs."""

    def __init__(self, bilinear: bool = False, classes: int = 2) -> None:
        super().__init__()
        self.inc = _Double(3, 8)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _Double(8, 16))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _Double(16, 32))
        self.up1 = _Up(32, 16, bilinear)
        self.up2 = _Up(16, 8, bilinear)
        self.outc = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        y = self.up1(self.down2(x2), x2)
        return self.outc(self.up2(y, x1))


class Crops(nn.Module):
    """Spatial crops and pads that spare the channels, and a hidden Linear sliced by them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 1)
        self.pad = nn.ReflectionPad2d(1)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))[..., 1:, :-1]  # crop H and W of a 4-D tensor
        y = self.b(self.pad(y[:, :, :, None, 1:][:, :, :, 0]))
        y = torch.relu(y).narrow(-1, 0, 4).narrow(2, 1, 4)
        z = self.c(y[1:])  # batch slice
        h = torch.relu(self.fc1(z.mean((2, 3))))
        return self.fc2(h[..., :4])  # slices the Linear's features (rank unknown): frozen


class PadsChannels(nn.Module):
    """F.pad whose spec reaches the channels of a 4-D tensor: never pruned through."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.pad(self.a(x), [0, 0, 0, 0, 1, 1])
        return self.head(y) + self.head(nn.functional.pad(self.b(x)[:, 1:], [0, 0, 0, 0, 1, 2]))


class _PadConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride))


class StyleNet(nn.Module):
    """Fast neural style's shape: reflection padding, instance norms, a residual, upsampling."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv1, self.in1 = _PadConv(3, 8, 5), nn.InstanceNorm2d(8, affine=affine)
        self.conv2, self.in2 = _PadConv(8, 16, 3, 2), nn.InstanceNorm2d(16, affine=affine)
        self.res_a, self.res_in_a = _PadConv(16, 16, 3), nn.InstanceNorm2d(16, affine=affine)
        self.res_b, self.res_in_b = _PadConv(16, 16, 3), nn.InstanceNorm2d(16, affine=affine)
        self.up, self.in3 = _PadConv(16, 8, 3), nn.InstanceNorm2d(8, affine=affine)
        self.out = _PadConv(8, 3, 5)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.in2(self.conv2(self.relu(self.in1(self.conv1(x))))))
        y = y + self.res_in_b(self.res_b(self.relu(self.res_in_a(self.res_a(y)))))
        y = nn.functional.interpolate(y, scale_factor=2, mode="nearest")
        return self.out(self.relu(self.in3(self.up(y))))


class GroupNormNet(nn.Module):
    """GroupNorm everywhere (small-batch ResNets, diffusion U-Nets): a stem, a residual
    block, a concatenation normalised by one GroupNorm, a one-group GroupNorm and a
    per-channel one, a classifier."""

    def __init__(self, num_classes: int = 10, affine: bool = True) -> None:
        super().__init__()
        self.stem, self.gn0 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16, affine=affine)
        self.a, self.gn_a = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(8, 16, affine=affine)
        self.b, self.gn_b = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(2, 16, affine=affine)
        self.left, self.right = nn.Conv2d(16, 12, 1), nn.Conv2d(16, 8, 1)
        self.gn_cat = nn.GroupNorm(5, 20, affine=affine)  # runs of 4: 3 in left, 2 in right
        self.one, self.gn_one = nn.Conv2d(20, 8, 3, padding=1), nn.GroupNorm(1, 8, affine=affine)
        self.last, self.gn_last = nn.Conv2d(8, 12, 1), nn.GroupNorm(12, 12, affine=affine)
        self.fc = nn.Linear(12, num_classes)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.gn0(self.stem(x)))
        x = self.act(x + self.gn_b(self.b(self.act(self.gn_a(self.a(x))))))
        x = self.act(self.gn_cat(torch.cat([self.left(x), self.right(x)], 1)))
        x = self.act(self.gn_one(self.one(x)))
        x = self.act(self.gn_last(self.last(x)))
        return self.fc(x.mean((2, 3)))


class _TimeBlock(nn.Module):
    """A diffusion U-Net's residual block: GroupNorm, SiLU, a time embedding added per channel."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(nn.functional.silu(t))[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyDiffusion(nn.Module):
    """A denoiser's shape: ``forward(x, t)``, a timestep MLP, GroupNorm blocks, a skip concat."""

    def __init__(self, ch: int = 16, tdim: int = 8) -> None:
        super().__init__()
        self.tmlp = nn.Sequential(nn.Linear(1, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.d1 = _TimeBlock(ch, ch, tdim)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = _TimeBlock(ch, 2 * ch, tdim)
        self.u1 = _TimeBlock(3 * ch, ch, tdim)  # groups of 12 over 32 + 16: they straddle
        self.out_norm, self.out = nn.GroupNorm(4, ch), nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.tmlp(t[:, None])
        h1 = self.d1(self.inc(x), temb)
        h = nn.functional.interpolate(self.mid(self.down(h1), temb), scale_factor=2.0)
        h = self.u1(torch.cat([h, h1], 1), temb)
        return self.out(nn.functional.silu(self.out_norm(h)))


class IRBlock(nn.Module):
    """InsightFace's IResNet block: BN, conv, BN, per-channel PReLU, conv, BN, a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(c), nn.PReLU(c)
        self.conv2, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))


class PReLUNet(nn.Module):
    """A face-recognition trunk: a stem with a per-channel PReLU, IResNet blocks, an embedding."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.prelu, self.blocks = nn.PReLU(16), nn.Sequential(IRBlock(16), IRBlock(16))
        self.mid, self.act = nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.PReLU()  # one slope
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.prelu(self.bn(self.stem(x))))
        return self.fc(self.act(self.mid(x)).mean((2, 3)))


class TimeConditioned(nn.Module):
    """``forward(x, t)`` with integer timesteps looked up in an embedding (a denoiser's way)."""

    def __init__(self, steps: int = 10) -> None:
        super().__init__()
        self.a, self.emb = nn.Conv2d(3, 8, 3, padding=1), nn.Embedding(steps, 4)
        self.b, self.act = nn.Conv2d(8, 4, 1), nn.ReLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x))) + self.emb(t)[:, :, None, None]


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class IdaUp(nn.Module):
    """CenterNet's IDA-up in small: a depthwise transposed conv upsamples the deeper
    level (``groups == channels``), whose sum with the shallower one a conv reads.

    ``groups`` other than the channel count makes the upsampling a grouped one.
    """

    def __init__(self, groups: int = 16) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.down = _cbr(16, 32, stride=2)
        self.proj = _cbr(32, 16)
        self.up = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, groups=groups, bias=False)
        self.node = _cbr(16, 16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        u = self.up(self.proj(self.down(a)))
        return self.head(self.node(u + a))
