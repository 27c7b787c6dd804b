"""Layers at several depths of a network, found from the resolutions of one probe forward (not from names):
encoder, bottleneck and decoder of MONAI's U-Nets, stages of classifiers, and their pairing between two networks."""

import pytest
import torch
from conftest import tiny_unet, tiny_unet3d
from monai.networks.nets import BasicUNet, DenseNet, DynUNet, SegResNet, UNet, resnet10

from medkd.errors import ConfigError
from medkd.knowledge.features import Depth, default_feature_layer, feature_depths, match_depths


def _roles(depths: list[Depth]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(d.role, d.size, d.layer) for d in depths]


@pytest.mark.parametrize(
    "make, size, expected",
    [
        (
            lambda: UNet(2, 1, 3, (4, 8, 16, 32), (2, 2, 2), num_res_units=2),
            64,
            [("encoder", 32, "model.0"), ("encoder", 16, "model.1.submodule.0"),
             ("bottleneck", 8, "model.1.submodule.1.submodule.1.submodule"),
             ("decoder", 16, "model.1.submodule.1.submodule"), ("decoder", 32, "model.1.submodule")],
        ),
        (
            lambda: BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4)),
            32,
            [("encoder", 32, "conv_0"), ("encoder", 16, "down_1"), ("encoder", 8, "down_2"), ("encoder", 4, "down_3"),
             ("bottleneck", 2, "down_4"), ("decoder", 4, "upcat_4"), ("decoder", 8, "upcat_3"),
             ("decoder", 16, "upcat_2"), ("decoder", 32, "upcat_1")],
        ),
        (
            lambda: DynUNet(2, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]),
            32,
            [("encoder", 32, "input_block"), ("encoder", 16, "downsamples.0"), ("bottleneck", 8, "bottleneck"),
             ("decoder", 16, "upsamples.0"), ("decoder", 32, "skip_layers")],  # skip_layers returns upsamples.1's map
        ),
        (
            lambda: SegResNet(2, init_filters=8, out_channels=3, blocks_down=(1, 1, 1), blocks_up=(1, 1)),
            32,
            [("encoder", 32, "down_layers.0"), ("encoder", 16, "down_layers.1"), ("bottleneck", 8, "down_layers.2"),
             ("decoder", 16, "up_layers.0"), ("decoder", 32, "up_layers.1")],
        ),
        (
            lambda: DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2)),
            64,
            [("encoder", 32, "features.norm0"), ("encoder", 16, "features.denseblock1"),
             ("encoder", 8, "features.denseblock2"), ("encoder", 4, "features.denseblock3"),
             ("bottleneck", 2, "features")],
        ),
        (
            lambda: resnet10(spatial_dims=2, n_input_channels=1, num_classes=2),
            64,
            [("encoder", 64, "bn1"), ("encoder", 32, "layer1"), ("encoder", 16, "layer2"), ("encoder", 8, "layer3"),
             ("bottleneck", 4, "layer4")],
        ),
    ],
    ids=["UNet", "BasicUNet", "DynUNet", "SegResNet", "DenseNet", "ResNet"],
)  # fmt: skip
def test_feature_depths_are_found_by_resolution_in_common_networks(make, size, expected):
    torch.manual_seed(0)
    net = make().train()
    depths = feature_depths(net, torch.randn(2, 1, size, size))
    assert _roles(depths) == [(role, (s, s), layer) for role, s, layer in expected]
    features = dict(net.named_modules())
    assert all(d.channels > 0 and d.layer in features for d in depths)
    assert net.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    bottleneck = next(d.layer for d in depths if d.role == "bottleneck")
    if isinstance(net, (UNet, DenseNet)) or hasattr(net, "layer4"):  # named by default_feature_layer: the same
        assert default_feature_layer(net) == bottleneck


def test_feature_depths_in_3d_and_default_layer_of_an_unknown_architecture():
    depths = feature_depths(tiny_unet3d(), torch.zeros(1, 1, 16, 16, 16))
    assert _roles(depths) == [("encoder", (8, 8, 8), "model.0"),
                              ("bottleneck", (4, 4, 4), "model.1.submodule.1.submodule"),
                              ("decoder", (8, 8, 8), "model.1.submodule")]  # fmt: skip
    assert [d.channels for d in depths] == [4, 16, 4]
    basic = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))
    with pytest.raises(ConfigError, match="cannot choose a default feature layer for BasicUNet"):
        default_feature_layer(basic)
    assert default_feature_layer(basic, torch.zeros(1, 1, 32, 32)) == "down_4"  # probed: its bottleneck


def test_match_depths_pairs_roles_by_resolution_and_the_bottlenecks_whatever_their_size():
    x = torch.zeros(1, 1, 32, 32)
    deep = feature_depths(UNet(2, 1, 2, (4, 8, 16, 32), (2, 2, 2), num_res_units=1), x)  # bottleneck /8
    shallow = feature_depths(tiny_unet(), x)  # bottleneck /4
    assert match_depths(deep, shallow, "multi") == [
        ("model.0", "model.0"),
        ("model.1.submodule.1.submodule.1.submodule", "model.1.submodule.1.submodule"),
        ("model.1.submodule", "model.1.submodule"),
    ]
    assert match_depths(deep, shallow, "encoder") == match_depths(deep, shallow, "multi")[:2]
    assert match_depths(deep, shallow, "decoder") == [("model.1.submodule", "model.1.submodule")]
