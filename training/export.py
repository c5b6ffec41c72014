"""Export a trained quality network: ONNX for the runtime, safetensors for the weights.

No pickle leaves this module: weights are safetensors, the graph is ONNX, the metadata
JSON. The ONNX graph is checked against torch on real faces before it is accepted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fiqa_gate_training.models import Normalise, QualityNet
from fiqa_gate_training.train import predict, save_whole, to_input

from fiqa_gate.assets import atomic_write_json, onnx_session, sha256_file

MAX_ABS_DIFF = 1e-4


def save_weights(model: QualityNet, path: Path) -> None:
    from safetensors.torch import save_file

    save_whole(lambda f: save_file({k: v.contiguous() for k, v in
                                    model.state_dict().items()}, f), path)


def load_weights(model: QualityNet, path: Path) -> QualityNet:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model.eval()


def export_onnx(model: QualityNet, path: Path, input_size: int, check_crops: np.ndarray
                ) -> float:
    """Write `path` (input "input" [N,3,S,S] 0..255 RGB, output "quality" [N]) and return
    the largest |ONNX - torch| on `check_crops`; refuses the export above MAX_ABS_DIFF."""
    model.eval()
    tmp = path.with_name(path.stem + ".tmp.onnx")
    write_graph(folded(model, input_size), tmp, input_size, "quality")
    got = run_onnx(tmp, check_crops, input_size)
    want = predict(model, check_crops, input_size)
    diff = float(np.abs(got - want).max())
    if diff > MAX_ABS_DIFF:
        tmp.unlink()
        raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} > {MAX_ABS_DIFF}")
    tmp.replace(path)
    return diff


class _FixedPositions(torch.nn.Module):
    """EdgeNeXt's Fourier position encoding depends on the input size only: computed once."""

    def __init__(self, positions: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("positions", positions)

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        return self.positions.expand(shape[0], -1, -1, -1)


@torch.no_grad()
def folded(model: QualityNet, input_size: int) -> QualityNet:
    """An inference copy of `model` for one input size, with the same outputs and fewer
    graph nodes: EdgeNeXt's layer-scale gammas folded into the Linear before them, its
    position encodings precomputed, and the 0..255 normalisation folded into an unpadded
    stem convolution. Other backbones pass through unchanged. The ONNX check compares the
    graph against the unfolded model, so a wrong fold cannot ship."""
    from timm.models.edgenext import ConvBlock, PositionalEncodingFourier, SplitTransposeBlock

    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if isinstance(block, ConvBlock | SplitTransposeBlock) and block.gamma is not None:
            fc2 = block.mlp.fc2
            fc2.weight.mul_(block.gamma[:, None])
            fc2.bias.mul_(block.gamma)
            block.gamma = None
    encoders = [m for m in model.modules() if isinstance(m, PositionalEncodingFourier)]
    positions: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, _, out: positions.__setitem__(id(m), out[:1]))
             for m in encoders]
    model(torch.zeros(1, 3, input_size, input_size))
    for hook in hooks:
        hook.remove()
    for block in model.modules():
        if isinstance(block, SplitTransposeBlock) and block.pos_embd is not None:
            block.pos_embd = _FixedPositions(positions[id(block.pos_embd)])
    stem = getattr(model.backbone, "stem", None)
    first = stem[0] if isinstance(stem, torch.nn.Sequential) else None
    if (isinstance(model.normalise, Normalise) and isinstance(first, torch.nn.Conv2d)
            and first.padding == (0, 0) and first.bias is not None):
        # conv((x - mean) * s) = conv'(x) with w' = w * s, b' = b - sum(w * mean * s)
        scale = model.normalise.inv_std.view(1, -1, 1, 1)
        shift = (model.normalise.mean * model.normalise.inv_std).view(1, -1, 1, 1)
        first.bias.sub_((first.weight * shift).sum((1, 2, 3)))
        first.weight.mul_(scale)
        model.normalise = torch.nn.Identity()
    return model


def write_graph(module: torch.nn.Module, path: Path, input_size: int,
                *outputs: str) -> None:
    """`module` as an ONNX graph: input "input" [N,3,S,S] 0..255 RGB, any batch size, one
    named output per tensor the module returns."""
    axes = {name: {0: "batch"} for name in ("input", *outputs)}
    torch.onnx.export(module, (torch.zeros(2, 3, input_size, input_size),), str(path),
                      input_names=["input"], output_names=list(outputs), opset_version=17,
                      dynamo=False, dynamic_axes=axes)


def graph_session(module: torch.nn.Module, input_size: int, *outputs: str) -> Any:
    """An ONNX Runtime session of `module` (`write_graph`'s contract); the graph file is
    temporary, the session keeps it in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        write_graph(module, path, input_size, *outputs)
        return onnx_session(path)


def run_onnx(path: Path, crops: np.ndarray, input_size: int, batch: int = 64) -> np.ndarray:
    """Raw outputs of an exported graph on uint8 crops, prepared as in training. An int8
    graph is run with `batch=1`, as the runtime runs it (fiqa_gate/student.py)."""
    session = onnx_session(path)
    out = [session.run(None, {"input": to_input(crops[i:i + batch], input_size).numpy()})[0]
           for i in range(0, len(crops), batch)]
    return np.concatenate([o.reshape(-1) for o in out]).astype(np.float64)


def quantize_int8(src: Path, dst: Path, check_crops: np.ndarray, input_size: int
                  ) -> dict[str, float]:
    """Dynamic int8 quantisation of the MatMul weights (EdgeNeXt's pointwise layers, most
    of its time); returns how far the int8 graph's output moves from the float one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from scipy.stats import spearmanr

    # onnx's own error on a full disk is a protobuf DecodeError: save_whole says it in a line
    try:
        save_whole(lambda f: quantize_dynamic(str(src), f, weight_type=QuantType.QInt8,
                                              op_types_to_quantize=["MatMul"]), dst)
    finally:  # onnxruntime's shape-inference copy, torn when the disk filled under it
        src.with_name(src.stem + "-inferred.onnx").unlink(missing_ok=True)
    before = run_onnx(src, check_crops, input_size)
    after = run_onnx(dst, check_crops, input_size, batch=1)
    return {"max_abs_diff": float(np.abs(before - after).max()),
            "srcc": float(spearmanr(before, after).statistic), "faces": len(check_crops)}


def write_metadata(onnx_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    meta = {**meta, "sha256": sha256_file(onnx_path)}
    atomic_write_json(onnx_path.with_suffix(".json"), meta)
    return meta
