"""Networks: shapes for 2D and 3D, the dense dilated bottleneck, the cascade, the masked output; 2D and 2.5D networks
on volumes; flip test-time augmentation."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.inferers import SimpleInferer, SliceInferer
from monai.networks.nets import UNet

from monai_dose.checkpoints import load_weights
from monai_dose.inferers import FlipTTAInferer
from monai_dose.networks import DCNN, AxialSliceNetwork, Cascade, DilatedDenseBlock, MaskedDose, volume_model
from monai_dose.transforms import SliceNeighbours, mask_channel


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


class Counted(torch.nn.Module):
    """``network``, recording the batch size of every call."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.network(x)


@pytest.mark.parametrize("slice_major", [False, True])
def test_axial_slice_network_matches_monai_slice_inferer(slice_major):
    """Same output as MONAI's SliceInferer for a batch of volumes whose depth is not a multiple of the batch."""
    torch.manual_seed(0)
    net = DCNN(2, in_channels=3, out_channels=2, channels=(4, 8)).eval()
    volumes = torch.rand(2, 3, 16, 16, 11)
    if slice_major:
        volumes = volumes.movedim(-1, 0).contiguous().movedim(0, -1)
    counted = Counted(net)
    with torch.no_grad():
        expected = SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=4, progress=False)(volumes, net)
        result = AxialSliceNetwork(counted, sw_batch_size=4)(volumes)
    assert result.shape == (2, 2, 16, 16, 11)
    torch.testing.assert_close(result, expected)
    assert counted.calls == [4, 4, 4, 4, 4, 2]  # 22 slices, at most 4 per call


def _on_stacked_slices(net: torch.nn.Module, volumes: torch.Tensor, neighbours: int) -> torch.Tensor:
    """``net`` on every slice of ``volumes`` with its neighbours stacked as channels (:class:`SliceNeighbours`)."""
    stacked = [SliceNeighbours(neighbours)(v).movedim(-1, 0) for v in volumes]  # (D, C * (2n + 1), H, W) each
    return torch.stack([net(s).movedim(0, -1) for s in stacked])


@pytest.mark.parametrize("neighbours", [1, 2])
@pytest.mark.parametrize("mask_slices", [None, (0, 4), (3, 8), (6, 11)])
def test_2_5d_network_on_volumes_equals_stacked_slices(neighbours, mask_slices):
    """The first convolution run over the volume (a 3D convolution spanning the neighbours) gives the network's
    output on the stacked slices, edges replicated; with a mask channel only its slices are computed, each still
    with its true neighbours."""
    torch.manual_seed(0)
    net = DCNN(2, in_channels=3 * (2 * neighbours + 1), out_channels=1, channels=(4, 8)).eval()
    volumes = torch.rand(2, 3, 16, 16, 11)
    channel = None
    if mask_slices is not None:
        channel, (first, last) = 2, mask_slices
        volumes[:, 2] = 0
        volumes[1, 2, 4:12, 4:12, first:last] = 1  # in one volume of the batch only
    with torch.no_grad():
        expected = _on_stacked_slices(net, volumes, neighbours)
        result = AxialSliceNetwork(net, neighbours, sw_batch_size=4, mask_channel=channel)(volumes)
    assert result.shape == expected.shape == (2, 1, 16, 16, 11)
    if mask_slices is None:
        torch.testing.assert_close(result, expected)
    else:
        torch.testing.assert_close(result[..., first:last], expected[..., first:last])
        assert not result[..., :first].any() and not result[..., last:].any()


def test_2_5d_network_runs_under_bf16_autocast_and_checks_its_stem():
    torch.manual_seed(0)
    net = DCNN(2, in_channels=9, out_channels=1, channels=(4, 8)).eval()
    volumes = torch.rand(1, 3, 16, 16, 5)
    with torch.no_grad():
        expected = _on_stacked_slices(net, volumes, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = AxialSliceNetwork(net, 1)(volumes)
    assert result.dtype == torch.float32  # DCNN's float32 output layer
    torch.testing.assert_close(result, expected, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="not 2 slices|not 5 slices"):
        AxialSliceNetwork(net, 2)
    with pytest.raises(ValueError, match="has no Conv2d"):
        AxialSliceNetwork(torch.nn.Identity(), 1)


def test_volume_model_shares_the_trained_model():
    """The volume form of a 2.5D training model: its weights, masked by the volume's mask channel."""
    torch.manual_seed(0)
    network = DCNN(2, in_channels=45, out_channels=1, channels=(4, 8))
    torch.nn.init.constant_(network.head.conv.bias, 5.0)
    model = MaskedDose(network, mask_channel=mask_channel("target_proximity", 1))
    volumes = torch.rand(1, 15, 16, 16, 6)
    volumes[:, 14] = (torch.rand(1, 16, 16, 6) > 0.3).float()
    on_volumes = volume_model(model, "target_proximity", neighbours=1).eval()
    with torch.no_grad():
        result = on_volumes(volumes)
        expected = _on_stacked_slices(model.eval(), volumes, 1)
    assert {id(p) for p in on_volumes.parameters()} == {id(p) for p in model.parameters()}
    torch.testing.assert_close(result, expected)
    assert result.max() > 0 and not result[volumes[:, 14:] == 0].any()
    assert volume_model(model, "target_proximity", spatial_dims=3) is model


def test_frame_runs_the_network_in_the_training_crop(caplog):
    """With a frame, the network runs in the window that training crops around the mask (FrameCrop), 0 outside it:
    centred on the mask, kept inside the grid where it fits, reaching beyond it (0) where the grid is smaller, and
    cutting a mask larger than the frame (with a warning)."""
    from monai_dose.transforms import FrameCrop

    torch.manual_seed(0)
    net = DCNN(2, in_channels=9, out_channels=1, channels=(4, 8)).eval()
    plain = AxialSliceNetwork(net, 1, mask_channel=2)

    def check(frame, rows, columns, window):
        """The mask at ``rows`` x ``columns`` (slice 3); the network's output is the network on the FrameCrop window,
        whose rows and columns on the grid ``window`` gives, and 0 elsewhere."""
        volumes = torch.rand(1, 3, 32, 24, 7)
        volumes[:, 2] = 0
        volumes[:, 2, rows, columns, 3] = 1
        with torch.no_grad():
            result = AxialSliceNetwork(net, 1, mask_channel=2, frame=frame)(volumes)
            cropped = FrameCrop(frame, lambda m: m > 0, channel_indices=2, margin=(0, 0, 1))(volumes[0])
            expected = plain(cropped[None].as_tensor())
        assert expected.shape[2:] == (*frame, 3)
        (top, bottom), (left, right) = window
        on_grid = (
            slice(max(-top, 0), frame[0] - max(bottom - 32, 0)),
            slice(max(-left, 0), frame[1] - max(right - 24, 0)),
        )
        torch.testing.assert_close(
            result[..., max(top, 0) : bottom, max(left, 0) : right, 2:5], expected[(..., *on_grid, slice(None))]
        )
        result[..., max(top, 0) : bottom, max(left, 0) : right, 2:5] = 0
        assert not result.any() and expected.abs().sum() > 0

    check((16, 16), slice(10, 18), slice(4, 20), ((6, 22), (4, 20)))  # centred on the mask
    check((16, 16), slice(0, 4), slice(2, 8), ((0, 16), (0, 16)))  # at the grid's corner: kept inside the grid
    check((40, 16), slice(10, 18), slice(4, 20), ((-6, 34), (4, 20)))  # 40 rows > 32: beyond the grid, 0 there
    with caplog.at_level(logging.WARNING, logger="monai_dose.networks.slices"):
        check((16, 16), slice(3, 24), slice(1, 24), ((6, 22), (5, 21)))  # 21 x 23: cut about the mask's centre
    assert f"{21 * 23 - 16 * 16} voxels of the possible-dose mask lie outside" in caplog.text
    with pytest.raises(ValueError, match="in-plane"):
        AxialSliceNetwork(net, 1, mask_channel=2, frame=(16,))
    with pytest.raises(ValueError, match="in-plane"):
        AxialSliceNetwork(net, 1, frame=(16, 16))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_tta_inferer(spatial_dims):
    """The mean of the prediction and the flipped-back prediction of the left-right mirror image, each network call
    predicting its input and its mirror image together; the result is symmetric under the flip."""
    torch.manual_seed(0)
    net = DCNN(spatial_dims, in_channels=3, out_channels=1, channels=(4, 8)).eval()
    volumes = torch.rand(1, 3, 16, 16, 8 if spatial_dims == 3 else 11)
    network = AxialSliceNetwork(net, sw_batch_size=32) if spatial_dims == 2 else net
    counted = Counted(network)
    with torch.no_grad():
        expected = (network(volumes) + network(volumes.flip(3)).flip(3)) / 2
        result = FlipTTAInferer(SimpleInferer())(volumes, counted)
        mirrored = FlipTTAInferer(SimpleInferer())(volumes.flip(3), network)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(mirrored, result.flip(3))
    assert counted.calls == [2]  # the volume and its mirror image in one call


def test_wider_dcnn_starts_from_a_narrower_ones_weights(tmp_path):
    """Capacity added to trained weights: the wider DCNN computes what the narrower one did, in train and eval mode,
    and its extra channels learn from the first step; load_weights does it for a narrower checkpoint."""
    torch.manual_seed(0)
    narrow = DCNN(2, 9, 1, channels=(4, 8, 16), dilations=(2, 3))
    for module in narrow.modules():  # trained-looking batch norms, so that they are under test too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.bias.data.uniform_(-1, 1)
    wide = DCNN(2, 9, 1, channels=(6, 12, 20), dilations=(2, 3), growth=6)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    load_weights(wide, tmp_path / "narrow.pt")
    x = torch.rand(3, 9, 16, 16)
    for train in (False, True):
        narrow.train(train), wide.train(train)
        torch.testing.assert_close(wide(x), narrow(x))
    reader = wide.encoders[0][1].conv.weight  # reads encoders.0.0's 2 extra channels
    assert not reader[:4, 4:].any() and reader[4:, 4:].any()
    wide(x).square().mean().backward()
    assert reader.grad[:4, 4:].abs().sum() > 0  # the extra channels' outgoing weights learn
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="wide.pt: channels .* do not fit"):
        load_weights(narrow, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="other layers"):
        DCNN(2, 9, 1, channels=(6, 12, 20, 40), dilations=(2, 3)).load_narrower(narrow.state_dict())
