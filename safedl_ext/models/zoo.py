"""The networks of the thesis's experiments, for [0, 1] inputs wrapped in :class:`Normalized`.

Every network here takes ``(N, in_channels, H, W)`` images with ``H, W >= 8`` and returns
logits ``(N, num_classes)``: the spatial size is reduced with adaptive average pooling before
the classifier head, so MNIST (1 x 28 x 28) and CIFAR-10 (3 x 32 x 32) both work unchanged.

The ResNets, the WideResNet and the VGGs are the *CIFAR* variants used throughout the
adversarial-robustness literature: a 3x3 stride-1 stem and no max-pool, so a 32 x 32 input
keeps full resolution in the first stage. None of them normalizes its input; wrap them with
``Normalized`` (or build them with :func:`safedl_ext.models.build_model`).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGG", "VGG_CONFIGS", "MnistCNN", "PreActResNet18", "ResNet18", "WideResNet"]


def _check_io(in_channels: int, num_classes: int) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class _PoolTo(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d`` that passes an input already at the output size through.

    At 28 x 28 and 32 x 32 the MNIST CNN's feature map is already 4 x 4; PyTorch's CPU
    adaptive pooling still costs a full pass forward and backward (about 4% of a JARN
    step, which runs it three times), for an identity.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, s, s); x itself when H = W = s."""
        s = self.output_size
        if isinstance(s, int) and x.shape[-2:] == (s, s):
            return x
        return super().forward(x)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class MnistCNN(nn.Module):
    """The MNIST classifier of the thesis's JARN chapter: three conv layers, 64-128-256 filters.

    Layout (28 x 28 input)::

        conv3x3 stride 2 (C -> 64)    ReLU   -> 64 x 14 x 14
        conv3x3 stride 2 (64 -> 128)  ReLU   -> 128 x 7 x 7
        conv3x3 stride 2 (128 -> 256) ReLU   -> 256 x 4 x 4
        adaptive avg-pool to 4 x 4 (identity at 28 x 28 and 32 x 32), flatten (4,096)
        -> linear(K)                       [hidden = 0, the default]
        -> linear(hidden) ReLU linear(K)   [hidden > 0]

    Sources of the choices:

    * three convolutional layers with 64, 128 and 256 filters: the thesis (Chan 2021), for
      the MNIST model of the JARN experiments (Chan et al., ICLR 2020);
    * the authors' public code (``alvinchangw/JARN_ICLR2020``) holds only the CIFAR-10
      models (a WRN-34-10 classifier and a DCGAN-style discriminator whose conv layers
      halve the resolution with stride 2 while doubling the channels). The same downsampling
      by stride-2 convs is used here; the 3x3 kernels (padding 1, so a side shrinks to
      ceil(side / 2) like TensorFlow's "SAME"), the ReLUs, the absence of batch norm and the
      linear head are this package's choices, not the paper's. Without batch norm a sample's
      input gradient never depends on the other samples of its batch, which the
      Jacobian-based methods (JARN, IGAM, the backdoor scan) rely on in training mode too.

    Args:
        in_channels: C of the input (1 for MNIST).
        num_classes: K.
        hidden: width of an optional hidden fully connected layer (0 = none).

    Shapes:
        (N, C, H, W) with H, W >= 8 -> logits (N, K).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 0) -> None:
        super().__init__()
        _check_io(in_channels, num_classes)
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        head: list[nn.Module] = [_PoolTo(4), nn.Flatten()]
        if hidden > 0:
            head += [nn.Linear(256 * 16, hidden), nn.ReLU(inplace=True),
                     nn.Linear(hidden, num_classes)]
        else:
            head.append(nn.Linear(256 * 16, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN-ReLU-conv twice, + shortcut.

    The projection shortcut (when the shape changes) takes the pre-activated input, as in
    the original pre-activation networks.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU(inplace=False)
        self.proj: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.bn1(x))
        shortcut = x if self.proj is None else self.proj(a)
        out = self.conv1(a)
        out = self.conv2(self.drop(self.relu(self.bn2(out))))
        return out + shortcut


def _stage(block: type[nn.Module], cin: int, cout: int, n: int, stride: int,
           **kw: float) -> tuple[nn.Sequential, int]:
    layers = [block(cin, cout, stride, **kw)]
    layers += [block(cout, cout, 1, **kw) for _ in range(n - 1)]
    return nn.Sequential(*layers), cout


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016), CIFAR variant: 3x3 stem, no max-pool, stages 64-128-256-512.

    Four stages of two basic blocks (strides 1, 2, 2, 2), global average pooling and one
    linear layer. 11,173,962 parameters for 3 input channels and 10 classes.

    Shapes:
        (N, C, H, W) with H, W >= 8 -> logits (N, K).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        _check_io(in_channels, num_classes)
        self.stem = nn.Sequential(_conv3x3(in_channels, 64), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        stages, c = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            s, c = _stage(_BasicBlock, c, width, 2, stride)
            stages.append(s)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.fc(self.pool(self.stages(self.stem(x))))


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016b), CIFAR variant, stages 64-128-256-512.

    A plain 3x3 stem conv, four stages of two pre-activation blocks, and the final BN-ReLU
    that pre-activation networks need before pooling (some public CIFAR versions omit it).
    11,172,170 parameters for 3 input channels and 10 classes.

    Shapes:
        (N, C, H, W) with H, W >= 8 -> logits (N, K).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        _check_io(in_channels, num_classes)
        self.stem = _conv3x3(in_channels, 64)
        stages, c = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            s, c = _stage(_PreActBlock, c, width, 2, stride)
            stages.append(s)
        self.stages = nn.Sequential(*stages)
        self.post = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.fc(self.post(self.stages(self.stem(x))))


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-k (Zagoruyko & Komodakis 2016).

    A 3x3 stem with 16 channels, three stages of n = (depth - 4) / 6 pre-activation blocks
    with 16k, 32k and 64k channels (strides 1, 2, 2), final BN-ReLU, global average pooling
    and a linear layer. WRN-34-10 (the default) is the CIFAR-10 model of JARN's public code
    and of Madry et al.; WRN-28-10 has 36.5M parameters, WRN-34-10 46.2M.

    Args:
        depth: total depth, 6n + 4 (10, 16, 22, 28, 34, 40, ...).
        widen_factor: k, the width multiplier.
        dropout: dropout probability between the two convs of each block (0 = none).
        in_channels: C of the input. num_classes: K.

    Shapes:
        (N, C, H, W) with H, W >= 8 -> logits (N, K).
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, dropout: float = 0.0,
                 in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        _check_io(in_channels, num_classes)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), "
                             f"got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.depth, self.widen_factor = depth, widen_factor
        self.stem = _conv3x3(in_channels, 16)
        stages, c = [], 16
        for width, stride in ((16 * widen_factor, 1), (32 * widen_factor, 2),
                              (64 * widen_factor, 2)):
            s, c = _stage(_PreActBlock, c, width, n, stride, dropout=dropout)
            stages.append(s)
        self.stages = nn.Sequential(*stages)
        self.post = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.fc(self.post(self.stages(self.stem(x))))


VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    # Simonyan & Zisserman 2015, configurations A, B, D, E; "M" = 2x2 max-pool.
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-11/13/16/19 (Simonyan & Zisserman 2015), CIFAR variant: conv stack + one linear layer.

    The 3x3 conv stack of the configuration (with BN after each conv when ``batch_norm``),
    five 2x2 max-pools, global average pooling and a single 512 -> K linear layer, as in the
    CIFAR versions used by the robustness literature (about 14.7M parameters for VGG-16).
    The max-pools round up (``ceil_mode``), so inputs smaller than 32 x 32 (28 x 28 MNIST
    and down to 8 x 8) never shrink to zero; for 32 x 32 inputs this changes nothing.

    Args:
        config: "vgg11", "vgg13", "vgg16" or "vgg19".
        batch_norm: BN after every conv (then the convs carry no bias).
        in_channels: C of the input. num_classes: K.

    Shapes:
        (N, C, H, W) with H, W >= 8 -> logits (N, K).
    """

    def __init__(self, config: str = "vgg16", batch_norm: bool = True, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        _check_io(in_channels, num_classes)
        if config not in VGG_CONFIGS:
            raise ValueError(f"config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        self.config = config
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> logits (N, K)."""
        return self.fc(self.pool(self.features(x)))
