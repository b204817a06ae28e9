"""Networks: shapes for 2D and 3D, the dense dilated bottleneck, the cascade, the masked output; the slice inferer."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer, SliceInferer
from monai.networks.nets import UNet

from monai_dose.inferers import AxialSliceInferer, FlipTTAInferer
from monai_dose.networks import DCNN, Cascade, DilatedDenseBlock, MaskedDose


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dcnn_shapes(spatial_dims):
    net = DCNN(spatial_dims, in_channels=12, out_channels=1, channels=(4, 8, 16))
    x = torch.rand(2, 12, *([32] * spatial_dims))
    assert net(x).shape == (2, 1, *([32] * spatial_dims))


def test_dense_block_uses_dilations_and_grows():
    block = DilatedDenseBlock(2, in_channels=8, growth=4, dilations=(2, 3, 5, 7, 9))
    convs = [layer.conv for layer in block.layers]
    assert [c.dilation for c in convs] == [(2, 2), (3, 3), (5, 5), (7, 7), (9, 9)]
    assert [c.in_channels for c in convs] == [8, 12, 16, 20, 24]  # each layer sees all earlier outputs
    assert block(torch.rand(1, 8, 24, 24)).shape == (1, 8, 24, 24)


def test_dcnn_bottleneck_sees_far():
    """A dilated bottleneck gives a receptive field covering the whole 128 x 128 slice from its centre."""
    torch.manual_seed(0)  # a random 2-channel net on a blank input can have all its ReLUs off: no gradient at all
    net = DCNN(2, 1, 1, channels=(2, 4, 8, 16)).eval()
    x = torch.rand(1, 1, 128, 128, requires_grad=True)
    net(x)[0, 0, 64, 64].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    assert rows.min() <= 8 and rows.max() >= 120


def test_cascade_feeds_second_stage_input_and_first_output():
    first = UNet(2, 12, 1, channels=(4, 8), strides=(2,))
    second = UNet(2, 13, 1, channels=(4, 8), strides=(2,))
    assert Cascade(first, second)(torch.rand(1, 12, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(RuntimeError):
        Cascade(first, UNet(2, 12, 1, channels=(4, 8), strides=(2,)))(torch.rand(1, 12, 32, 32))


@pytest.mark.parametrize("amp", [False, True])
def test_masked_dose_output(amp):
    torch.manual_seed(0)
    net = MaskedDose(DCNN(2, 12, 1, channels=(4, 8)), mask_channel=11, amp=amp)
    x = torch.rand(2, 12, 16, 16)
    x[:, 11] = (torch.rand(2, 16, 16) > 0.5).float()
    y = net(x)
    assert y.dtype == torch.float32 and y.min() >= 0
    assert (y[:, 0][x[:, 11] == 0] == 0).all()
    y.sum().backward()  # trains through the autocast region
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_dose_output_is_not_quantised_by_bf16():
    """The output layer runs in float32 under bf16 autocast: doses near 70 Gy keep more than bf16's 0.5 Gy steps."""
    torch.manual_seed(0)
    net = DCNN(2, 12, 1, channels=(4, 8)).eval()
    torch.nn.init.normal_(net.head.conv.weight, std=3.0)
    torch.nn.init.constant_(net.head.conv.bias, 68.0)
    # features of a trained network, not the mostly-zero ones of an untrained one, reach the output layer
    net.head.register_forward_pre_hook(lambda _, args: (torch.rand(args[0].shape).to(args[0].dtype),))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dose = net(torch.rand(1, 12, 16, 16))
    assert dose.dtype == torch.float32
    assert 50 < dose.median() < 80
    assert dose.unique().numel() > 100  # bf16 holds only ..., 63.5, 64, 64.5, ... here


@pytest.mark.parametrize("slice_major", [False, True])
def test_axial_slice_inferer_matches_monai_slice_inferer(slice_major):
    """Same output as MONAI's SliceInferer for a batch of volumes whose depth is not a multiple of the batch."""
    torch.manual_seed(0)
    net = DCNN(2, in_channels=3, out_channels=2, channels=(4, 8)).eval()
    volumes = torch.rand(2, 3, 16, 16, 11)
    if slice_major:
        volumes = volumes.movedim(-1, 0).contiguous().movedim(0, -1)
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return net(x)

    with torch.no_grad():
        expected = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=4, progress=False)(volumes, net)
        result = AxialSliceInferer(sw_batch_size=4)(volumes, network)
    assert result.shape == (2, 2, 16, 16, 11)
    torch.testing.assert_close(result, expected)
    assert calls == [4, 4, 4, 4, 4, 2]  # 22 slices, at most 4 per call


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_tta_inferer(spatial_dims):
    """The mean of the prediction and the flipped-back prediction of the left-right mirror image, each network call
    predicting a chunk and its mirror image together; the result is symmetric under the flip."""
    torch.manual_seed(0)
    net = DCNN(spatial_dims, in_channels=3, out_channels=1, channels=(4, 8)).eval()
    volumes = torch.rand(1, 3, 16, 16, 8 if spatial_dims == 3 else 11)
    inferer = AxialSliceInferer(sw_batch_size=4) if spatial_dims == 2 else SimpleInferer()
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return net(x)

    with torch.no_grad():
        expected = (inferer(volumes, net) + inferer(volumes.flip(3), net).flip(3)) / 2
        result = FlipTTAInferer(inferer)(volumes, network)
        mirrored = FlipTTAInferer(inferer)(volumes.flip(3), net)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(mirrored, result.flip(3))
    assert calls == ([8, 8, 6] if spatial_dims == 2 else [2])  # chunk and mirror image in one call
