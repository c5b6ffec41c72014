"""The teacher as a scorer: its network's output, fused with the recognizer's embedding norm.

The teacher network is SFace with a quality head. SFace's un-normalised embedding norm is
itself a quality signal (MagFace's observation; with SFace it is the strongest baseline),
which a linear head on the embedding cannot compute, and on the validation identities the
two are complementary (normalised pAUC at 20 % discard, SFace: enhanced network 0.737,
norm 0.731, their fusion 0.724; labels 0.717). With `fuse_norm` in the teacher spec, a
teacher's score is the mean of the two as z-scores, each standardised on the labelled
training set, mapped back to the labels' mean and spread, so pseudo-labels sit on the
labels' scale. Equal weights, not tuned.

A network's output is cached in the run folder (`network_<network>_<set>.npy`), the norms
in `data/<set>_embedding_norm.npy` (the labelled sets' written by the data stage from the
pass that computes their labels), so the stages that need a score (pseudo-labels,
distillation targets) compute each once. On a set the cached trunk features do not cover
(A, B), the network's frozen trunk is SFace's own first layers, so one trunk pass feeds
both the network's remaining layers and SFace's, and gives both parts of the score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate.assets import atomic_save_array, atomic_write_json, read_state_json
from fiqa_gate.teacher import fuse, z_mix  # one fusion for training and the runtime


def norms_file(data: Path, set_name: str) -> Path:
    """Where a set's embedding norms are cached (the data stage writes the labelled ones)."""
    return data / f"{set_name}_embedding_norm.npy"


def embedding_norms(run: Any, set_name: str) -> np.ndarray:
    """The labelling recognizer's un-normalised embedding norm of every face of a set."""
    cache = norms_file(run.data, set_name)
    if not cache.exists():
        from fiqa_gate.evaluation.protocol import qualities

        raw, _ = qualities(run.samples(set_name), ("embedding-norm",),
                           run.cfg["data"]["recognizer"])
        atomic_save_array(cache, raw["embedding-norm"])
    return np.load(cache)


def _network_scores(run: Any, network: str, set_name: str) -> np.ndarray:
    """The network's raw output on a set: from the cached frozen features when they cover
    the set (the trunk is most of the cost); else from one trunk pass shared with the
    recognizer's embedding norm, or the whole network, through ONNX Runtime."""
    cache = run.out / f"network_{network}_{set_name}.npy"
    if cache.exists():
        return np.load(cache)
    from fiqa_gate_training.export import export_onnx, run_onnx
    from fiqa_gate_training.recipe import _load, views_file
    from fiqa_gate_training.train import predict_views

    spec = run.cfg["teacher"]
    model = _load(run, "teacher", network)
    crops = run.samples(set_name).crops
    offset = _offsets(run).get(set_name)
    path = views_file(run, spec)
    out = None
    if offset is not None and path.exists():
        out = predict_views(model, spec, crops, path, offset)
    recognizer = _recognizer_sharing_trunk(run, model) if out is None else None
    if recognizer is not None:
        out, norms = _score_and_norm(model, recognizer, int(spec["freeze"]), crops)
        if not norms_file(run.data, set_name).exists():
            atomic_save_array(norms_file(run.data, set_name), norms)
    if out is None:  # through ONNX Runtime: 1.6x torch's speed on a 2-core CPU
        graph = run.out / f"{network}.labelling.onnx"  # derived, so not kept
        try:
            export_onnx(model, graph, spec["input_size"], crops[:64])  # checked vs torch
            out = run_onnx(graph, crops, spec["input_size"])
        finally:
            graph.unlink(missing_ok=True)
    atomic_save_array(cache, out)
    return out


def _recognizer_sharing_trunk(run: Any, model: Any) -> Any:
    """SFace's torch backbone when the network's frozen trunk is its own first layers
    (the SFace teacher of the CPU recipe), so one trunk pass can give both the network's
    output and the recognizer's embedding norm; else None."""
    import torch
    from fiqa_gate_training.models import build_model

    spec = run.cfg["teacher"]
    freeze = int(spec.get("freeze", 0))
    if not (freeze and spec.get("fuse_norm") and spec["backbone"] == "sface"
            and int(spec["input_size"]) == 112 and run.cfg["data"]["recognizer"] == "sface"):
        return None
    sface = build_model(spec).backbone
    trunk, original = model.backbone[:freeze].state_dict(), sface[:freeze].state_dict()
    return sface if all(torch.equal(trunk[k], original[k]) for k in original) else None


def _score_and_norm(model: Any, sface: Any, freeze: int, crops: np.ndarray, batch: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(network output, SFace embedding norm) of every face from one pass through the
    frozen trunk both share: SFace's own remaining layers run on the trunk's output. Half
    the cost of running the two networks (set B: 32k faces), checked on the first batch
    against the network in torch and against the runtime recognizer."""
    import torch
    from fiqa_gate_training.export import graph_session
    from fiqa_gate_training.train import predict, split, to_input
    from torch import nn
    from tqdm import tqdm

    from fiqa_gate.registry import get_recognizer

    class ScoreAndNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.tail = split(model, freeze)
            self.recognizer_tail = sface[freeze:]

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.trunk(x)
            embedding = self.recognizer_tail(features)
            return self.tail(features), torch.linalg.vector_norm(embedding, dim=1)

    size = 112  # SFace's input (`_recognizer_sharing_trunk` holds the teacher to it)
    session = graph_session(ScoreAndNorm().eval(), size, "quality", "norm")

    def infer(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, n = session.run(None, {"input": to_input(chunk, size).numpy()})
        return q.reshape(-1).astype(np.float64), n.reshape(-1).astype(np.float64)

    if len(crops) == 0:
        return np.zeros(0), np.zeros(0)
    check = crops[:batch]
    first = infer(check)
    if (np.abs(first[0] - predict(model, check, size)).max() > 1e-4 or np.abs(
            first[1] / get_recognizer("sface").embed_with_norms(check)[1] - 1).max() > 1e-4):
        raise RuntimeError("the shared-trunk pass differs from the network or the recognizer")
    parts = [first] + [infer(crops[i:i + batch]) for i in tqdm(
        range(batch, len(crops), batch), desc="teacher score + embedding norm", leave=False)]
    return np.concatenate([q for q, _ in parts]), np.concatenate([n for _, n in parts])


def _offsets(run: Any) -> dict[str, int]:
    """Where each set starts in the cached frozen features: the enhanced teacher's training
    faces, labelled then A (set B is never trained on with the frozen trunk)."""
    n_lab = sum(len(run.samples(name)) for name in run.labelled_sets())
    return {"labelled_train": 0, "unlabelled_a": n_lab}


def _fusion(run: Any, network: str) -> dict[str, float]:
    path = run.out / f"fusion_{network}.json"
    stats = read_state_json(path)
    if stats is not None:
        return stats
    net = _network_scores(run, network, "labelled_train")
    log_norm = np.log(embedding_norms(run, "labelled_train"))
    stats = {"net_mean": float(net.mean()), "net_std": float(net.std()),
             "norm_mean": float(log_norm.mean()), "norm_std": float(log_norm.std())}
    mix = z_mix(stats, net, log_norm)
    labels = run.samples("labelled_train").extra["label"]
    stats |= {"mix_std": float(mix.std()), "label_mean": float(labels.mean()),
              "label_std": float(labels.std())}
    atomic_write_json(path, stats)
    return stats


def teacher_scores(run: Any, network: str, set_name: str) -> np.ndarray:
    """A teacher's (`teacher` or `enhanced`) score of every face of a training set."""
    net = _network_scores(run, network, set_name)
    if not run.cfg["teacher"].get("fuse_norm"):
        return net
    return fuse(_fusion(run, network), net, embedding_norms(run, set_name))


def fusion_stats(run: Any, network: str) -> dict[str, float] | None:
    """The fusion's statistics (for scoring other faces, e.g. the test split), or None."""
    return _fusion(run, network) if run.cfg["teacher"].get("fuse_norm") else None
