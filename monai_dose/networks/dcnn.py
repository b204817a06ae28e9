"""The reference DCNN: a U-Net-like encoder-decoder with a dense block of dilated convolutions as bottleneck."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Pool
from torch import nn


class DilatedDenseBlock(nn.Module):
    """Densely connected dilated convolutions: each layer sees the block input and every earlier layer's output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels; the block returns ``in_channels`` channels too (1x1 fusion).
        growth: channels added by each dilated convolution.
        dilations: one convolution per dilation rate.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        growth: int,
        dilations: Sequence[int] = (2, 3, 5, 7, 9),
        act: str | tuple = "RELU",
        norm: str | tuple = "BATCH",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Convolution(spatial_dims, in_channels + i * growth, growth, dilation=d, act=act, norm=norm, dropout=dropout)
            for i, d in enumerate(dilations)
        )
        self.fuse = Convolution(
            spatial_dims, in_channels + len(dilations) * growth, in_channels, kernel_size=1, act=act, norm=norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.fuse(torch.cat(features, dim=1))


class DCNN(nn.Module):
    """U-Net-like dose network whose bottleneck is a :class:`DilatedDenseBlock` (the reference "DCNN").

    Each encoder level has two 3x3 convolutions (norm, activation) then max-pooling; the decoder upsamples with
    transposed convolutions, concatenates the skip connection and applies two convolutions; a 1x1 convolution
    gives the output, computed in float32 also under bfloat16 autocast (whose 8-bit mantissa would put the dose in
    0.5 Gy steps above 64 Gy, where the targets' D95 and D99 lie). Input sizes must be divisible by
    ``2 ** (len(channels) - 1)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (12 for the reference input set).
        out_channels: output channels (1: dose).
        channels: widths of the encoder levels; the last is the bottleneck width.
        dilations: dilation rates of the bottleneck's dense block.
        growth: channels added per dilated convolution (default: a quarter of the bottleneck width).
        dropout: dropout rate in the bottleneck.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 12,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        dilations: Sequence[int] = (2, 3, 5, 7, 9),
        growth: int | None = None,
        act: str | tuple = "RELU",
        norm: str | tuple = "BATCH",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")

        def double_conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                Convolution(spatial_dims, cin, cout, act=act, norm=norm),
                Convolution(spatial_dims, cout, cout, act=act, norm=norm),
            )

        self.in_channels, self.channels = in_channels, tuple(channels)
        self.growth, self.num_dilations = growth or channels[-1] // 4, len(dilations)
        widths = [in_channels, *channels]
        self.encoders = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(len(channels) - 1))
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        bottleneck = channels[-1]
        self.bottleneck = nn.Sequential(
            double_conv(channels[-2], bottleneck),
            DilatedDenseBlock(spatial_dims, bottleneck, self.growth, dilations, act, norm, dropout),
        )
        self.upsamples = nn.ModuleList(
            UpSample(spatial_dims, channels[i + 1], channels[i], scale_factor=2, mode="deconv")
            for i in reversed(range(len(channels) - 1))
        )
        self.decoders = nn.ModuleList(
            double_conv(2 * channels[i], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level, (upsample, decoder) in enumerate(zip(self.upsamples, self.decoders)):  # noqa: B905 (TorchScript)
            x = decoder(torch.cat([upsample(x), skips[-1 - level]], dim=1))
        if torch.jit.is_scripting():  # TorchScript runs in float32 anyway (and takes no device-dependent autocast)
            return self.head(x)
        return self._float32_head(x)

    @staticmethod
    def _input_groups(
        in_channels: int, channels: Sequence[int], growth: int, num_dilations: int
    ) -> dict[str, list[int]]:
        """The channel groups each convolution's input concatenates, by module name, for a DCNN of these widths."""
        groups = {"bottleneck.0.0.conv": [channels[-2]], "bottleneck.0.1.conv": [channels[-1]]}
        widths = [in_channels, *channels]
        for i in range(len(channels) - 1):
            groups |= {f"encoders.{i}.0.conv": [widths[i]], f"encoders.{i}.1.conv": [channels[i]]}
        for i in range(num_dilations + 1):
            name = f"bottleneck.1.layers.{i}.conv" if i < num_dilations else "bottleneck.1.fuse.conv"
            groups[name] = [channels[-1]] + [growth] * i
        for j, i in enumerate(reversed(range(len(channels) - 1))):
            groups[f"upsamples.{j}.deconv"] = [channels[i + 1]]
            groups |= {f"decoders.{j}.0.conv": [channels[i]] * 2, f"decoders.{j}.1.conv": [channels[i]]}
        groups["head.conv"] = [channels[0]]
        return groups

    def load_narrower(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the state dict of a DCNN of the same design with at most as many channels per level and dense-block
        growth: this network then computes what that one did (train and eval mode alike).

        Each layer keeps the narrower network's channels first; the extra channels keep their initial weights but
        send nothing on (the weights that read them from the old channels' layers start at zero), so that they
        learn from the first step: capacity added to trained weights.
        """
        if set(state) != set(self.state_dict()):
            raise ValueError("not the state of a DCNN of this design (other layers)")
        levels = len(self.channels)
        old_channels = [state[f"encoders.{i}.0.conv.weight"].shape[0] for i in range(levels - 1)]
        old_channels.append(state["bottleneck.0.0.conv.weight"].shape[0])
        old_growth = state["bottleneck.1.layers.0.conv.weight"].shape[0]
        if any(o > n for o, n in zip([*old_channels, old_growth], [*self.channels, self.growth], strict=True)):
            raise ValueError(
                f"channels {old_channels} (growth {old_growth}) do not fit in this DCNN's {list(self.channels)} "
                f"(growth {self.growth})"
            )
        old_groups = self._input_groups(self.in_channels, old_channels, old_growth, self.num_dilations)
        new_groups = self._input_groups(self.in_channels, self.channels, self.growth, self.num_dilations)
        merged = {}
        for key, value in self.state_dict().items():
            old = state[key].to(value.dtype)
            if value.ndim < 2:  # biases, norms, counters: the old channels come first
                merged[key] = value.clone()
                merged[key][tuple(slice(0, n) for n in old.shape)] = old
                continue
            name = key.rpartition(".")[0]
            in_dim = 0 if name.endswith("deconv") else 1  # transposed convolutions store (in, out, ...)
            starts = torch.tensor([0, *new_groups[name]]).cumsum(0)[:-1]
            rows = torch.cat([start + torch.arange(n) for start, n in zip(starts, old_groups[name], strict=True)])
            weight = value.clone()
            kept = weight.narrow(1 - in_dim, 0, old.shape[1 - in_dim])  # the old output channels
            kept.zero_()
            kept.index_copy_(in_dim, rows, old)
            merged[key] = weight
        self.load_state_dict(merged)

    @torch.jit.unused
    def _float32_head(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())
