"""Export a trained quality network: ONNX for the runtime, safetensors for the weights.

No pickle leaves this module: weights are safetensors, the graph is ONNX, the metadata
JSON. The ONNX graph is checked against torch on real faces before it is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fiqa_gate_training.models import QualityNet
from fiqa_gate_training.train import predict, to_input

from fiqa_gate.assets import sha256_file

MAX_ABS_DIFF = 1e-4


def save_weights(model: QualityNet, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


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
    write_graph(model, tmp, input_size, "quality")
    got = run_onnx(tmp, check_crops, input_size)
    want = predict(model, check_crops, input_size)
    diff = float(np.abs(got - want).max())
    if diff > MAX_ABS_DIFF:
        tmp.unlink()
        raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} > {MAX_ABS_DIFF}")
    tmp.replace(path)
    return diff


def write_graph(module: torch.nn.Module, path: Path, input_size: int, output: str) -> None:
    """`module` as an ONNX graph: input "input" [N,3,S,S] 0..255 RGB, any batch size."""
    torch.onnx.export(module, (torch.zeros(2, 3, input_size, input_size),), str(path),
                      input_names=["input"], output_names=[output], opset_version=17,
                      dynamo=False, dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}})


def run_onnx(path: Path, crops: np.ndarray, input_size: int, batch: int = 64) -> np.ndarray:
    """Raw outputs of an exported graph on uint8 crops, prepared as in training."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run(None, {"input": to_input(crops[i:i + batch], input_size).numpy()})[0]
           for i in range(0, len(crops), batch)]
    return np.concatenate([o.reshape(-1) for o in out]).astype(np.float64)


def quantize_int8(src: Path, dst: Path, check_crops: np.ndarray, input_size: int
                  ) -> dict[str, float]:
    """Dynamic int8 quantisation of the MatMul weights (EdgeNeXt's pointwise layers, most
    of its time); returns how far the int8 graph's output moves from the float one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from scipy.stats import spearmanr

    tmp = dst.with_name(dst.stem + ".tmp.onnx")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    before, after = (run_onnx(p, check_crops, input_size) for p in (src, tmp))
    tmp.replace(dst)
    return {"max_abs_diff": float(np.abs(before - after).max()),
            "srcc": float(spearmanr(before, after).statistic), "faces": len(check_crops)}


def write_metadata(onnx_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    meta = {**meta, "sha256": sha256_file(onnx_path)}
    tmp = onnx_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(onnx_path.with_suffix(".json"))
    return meta
