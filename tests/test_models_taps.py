"""Models by name, weights, feature taps (FX) and connectors: shapes from a dry forward, errors that list fixes."""

import pytest
import torch
import torchvision

from fastfit.distill.connectors import MMRazorConnector, PaperRegressor, build_connector
from fastfit.distill.taps import LOGITS, build_extractor, check_tap_paths, infer_shapes
from fastfit.errors import ModelError, TapError
from fastfit.models import build_model
from fastfit.models.small_cnns import SMALL_MODELS


def test_resnet_taps_have_the_mmrazor_shapes_at_224():
    student = build_model("resnet18", 1000)
    teacher = build_model("resnet50", 1000)
    s = infer_shapes(build_extractor(student, ["layer3", "layer4"], logits=True), 224)
    t = infer_shapes(build_extractor(teacher, ["layer3", "layer4"], logits=True), 224)
    assert s == {"layer3": (256, 14, 14), "layer4": (512, 7, 7), LOGITS: (1000,)}
    assert t == {"layer3": (1024, 14, 14), "layer4": (2048, 7, 7), LOGITS: (1000,)}


def test_extractor_matches_the_model_and_shares_its_parameters():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    out = build_extractor(model, ["layer2", "layer4.1"], logits=True)(x)
    torch.testing.assert_close(out[LOGITS], model(x))
    # The tapped layer2 output is what layer3 consumes: rerun the tail by hand.
    torch.testing.assert_close(
        model.fc(torch.flatten(model.avgpool(model.layer4(model.layer3(out["layer2"]))), 1)), out[LOGITS]
    )
    extractor = build_extractor(model, ["layer3"], logits=False)
    assert extractor.get_submodule("layer3.0.conv1").weight is model.layer3[0].conv1.weight


def test_truncated_extractor_holds_only_the_layers_up_to_the_tap():
    model = torchvision.models.resnet18(num_classes=10)
    truncated = build_extractor(model, ["layer2"], logits=False)
    names = {name for name, _ in truncated.named_parameters()}
    assert any(n.startswith("layer2.") for n in names)
    assert not any(n.startswith(("layer3.", "layer4.", "fc.")) for n in names)


def test_taps_keep_channels_last_and_survive_torch_compile():
    model = SMALL_MODELS["fitnet_thin"](num_classes=10).to(memory_format=torch.channels_last).eval()
    extractor = build_extractor(model, ["stage2"], logits=True)
    x = torch.randn(4, 3, 28, 28).to(memory_format=torch.channels_last)
    eager = extractor(x)
    assert eager["stage2"].is_contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(extractor, fullgraph=True, backend="aot_eager")(x)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key])


def test_wrong_tap_path_lists_valid_paths():
    model = build_model("resnet18", 10)
    with pytest.raises(
        TapError, match=r"student tap 'layer5' is not a module of resnet18; valid paths include: .*layer4"
    ):
        check_tap_paths(model, ["layer3", "layer5"], "student", "resnet18")


def test_unknown_model_and_bad_weights_say_what_to_do(tmp_path):
    with pytest.raises(
        ModelError, match=r"unknown model.student 'resnet19'; did you mean resnet18.*choose a torchvision classifier"
    ):
        build_model("resnet19", 10)
    with pytest.raises(ModelError, match=r"teacher weights file '.*missing.pt' does not exist"):
        build_model("resnet18", 10, str(tmp_path / "missing.pt"), role="teacher")
    with pytest.raises(
        ModelError, match=r"neither a file nor a torchvision weights name for resnet18; valid names: IMAGENET1K_V1"
    ):
        build_model("resnet18", 1000, "IMAGENET9K", role="teacher")
    with pytest.raises(ModelError, match=r"IMAGENET1K_V1 have 1000 classes but model.num_classes is 10"):
        build_model("resnet18", 10, "IMAGENET1K_V1")


def test_weights_load_from_a_plain_state_dict_and_mismatches_are_named(tmp_path):
    source = build_model("fitnet_thin", 10)
    path = tmp_path / "w.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # a DDP-style prefix is accepted
    loaded = build_model("fitnet_thin", 10, str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(
        ModelError, match=r"do not match the model: missing .*are model.student and model.num_classes right"
    ):
        build_model("wide_cnn", 10, str(path))


def test_demo_students_have_at_least_10x_fewer_parameters_and_accept_28_and_32():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    teacher = SMALL_MODELS["wide_cnn"](num_classes=10)
    for name in ("fitnet_thin", "fitnet_thin_wide"):
        student = SMALL_MODELS[name](num_classes=10)
        assert count(teacher) >= 10 * count(student), name
        depth = sum(isinstance(m, torch.nn.Conv2d) for m in student.modules())
        assert depth > sum(isinstance(m, torch.nn.Conv2d) for m in teacher.modules())
        for size in (28, 32):
            assert student(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_mmrazor_connector_is_1x1_conv_bn_relu():
    c = build_connector("mmrazor", (256, 14, 14), (1024, 14, 14))
    assert isinstance(c, MMRazorConnector)
    conv, bn, relu = c
    assert conv.kernel_size == (1, 1) and conv.bias is None and (conv.in_channels, conv.out_channels) == (256, 1024)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)


@pytest.mark.parametrize(
    "student, teacher, kernel", [((16, 9, 9), (32, 5, 5), (5, 5)), ((16, 7, 8), (8, 7, 6), (1, 3))]
)
def test_paper_regressor_kernel_makes_spatial_sizes_meet(student, teacher, kernel):
    c = build_connector("paper", student, teacher)
    assert isinstance(c, PaperRegressor) and c[0].kernel_size == kernel
    assert c(torch.randn(2, *student)).shape == (2, *teacher)


def test_connector_errors_name_the_fix():
    with pytest.raises(TapError, match=r"no convolutional regressor maps student 7×7 onto the larger teacher 14×14"):
        build_connector("paper", (8, 7, 7), (8, 14, 14))
    with pytest.raises(TapError, match=r"1×1 mmrazor connector needs equal spatial sizes.*connector = 'paper'"):
        build_connector("mmrazor", (8, 14, 14), (8, 7, 7))
    with pytest.raises(TapError, match=r"hints need \(C, H, W\) feature maps, got student \(512,\)"):
        build_connector("mmrazor", (512,), (8, 7, 7))


def test_connector_under_bf16_autocast_has_no_dtype_mismatch():
    connector = build_connector("mmrazor", (8, 7, 7), (16, 7, 7))
    feature = torch.randn(4, 8, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = connector(feature.to(torch.bfloat16))
    assert out.dtype in (torch.bfloat16, torch.float32)
    out.float().sum().backward()
    assert connector[0].weight.grad.dtype == torch.float32 and torch.isfinite(feature.grad).all()
