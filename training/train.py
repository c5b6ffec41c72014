"""One training loop for every network of the recipe: MSE + PLCC loss, resumable per epoch.

A network may freeze its first `freeze` backbone layers (the face-pretrained SFace
teacher does): their output is then computed once per face and view and cached, and only
the rest trains. With nothing frozen the "views" are the images themselves. Each face has
two views, as is and mirrored (mirroring never changes quality); training draws one at
random, prediction uses the unmirrored one, as the runtime does.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fiqa_gate_training.models import QualityNet
from torch import nn
from tqdm import tqdm

log = logging.getLogger("fiqa_gate.training")


def save_whole(save: Callable[[str], object], path: Path) -> None:
    """`save(file_name)` into a temporary file beside `path`, renamed over it once whole.
    torch's and safetensors' errors on a full disk are not OSErrors ("unexpected pos 704
    vs 598"): they become one, which the command line says in a line, and the torn
    temporary file goes."""
    import errno
    import shutil

    tmp = path.with_suffix(".tmp")
    try:
        save(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(errno.EIO, f"cannot write {path} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                                 f"{free:.0f} MiB free on its disk") from exc
    tmp.replace(path)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's PLCC loss: standardise both, penalise misfit before and after scaling by
    the correlation (so it is 0 only for a perfect linear relation)."""
    p = (pred - pred.mean()) / (pred.std(unbiased=False) + 1e-8)
    t = (target - target.mean()) / (target.std(unbiased=False) + 1e-8)
    rho = (p * t).mean()
    return (nn.functional.mse_loss(p, t) / 4 + nn.functional.mse_loss(rho * p, t) / 4) / 2


def quality_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(pred, target) + plcc_loss(pred, target)


def split(model: QualityNet, freeze: int) -> tuple[nn.Module | None, nn.Module]:
    """(frozen trunk or None, trainable tail) whose composition is `model`."""
    if freeze <= 0:
        return None, model
    if not isinstance(model.backbone, nn.Sequential):
        raise ValueError("freeze needs a sequential backbone (sface); set freeze: 0")

    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rest = model.backbone[freeze:]
            self.head = model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rest(x)).squeeze(-1)

    trunk = nn.Sequential(model.normalise, model.backbone[:freeze]).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk, Tail()


def to_input(crops: np.ndarray, size: int) -> torch.Tensor:
    """uint8 NHWC crops -> float32 NCHW 0..255 at the network's input size.

    Resized with cv2's bilinear filter on uint8, exactly as the runtime scorer does.
    """
    if crops.shape[1] != size:
        import cv2

        crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR)
                          for c in crops])
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()


def pixel_batch(crops: np.ndarray, idx: torch.Tensor, flips: torch.Tensor, size: int
                ) -> torch.Tensor:
    """The network input of crops `idx`, mirrored where `flips` is 1. Mirrors are made per
    batch, not stored: the CPU recipe's student stage peaked at 10.3 GiB with a stored
    copy of every face and its mirror, 6.2 GiB without."""
    chunk = crops[idx.numpy()]
    mirror = flips.numpy().astype(bool)
    chunk[mirror] = chunk[mirror][:, :, ::-1]
    return to_input(chunk, size)


def make_views(trunk: nn.Module, crops: np.ndarray, size: int,
               batch: int = 64, desc: str | None = None,
               known: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 2, C, h, w]: trunk outputs (float16) of each crop and its mirror.

    `known` holds the views of a prefix of `crops` computed earlier (the teacher's labelled
    set is the prefix of the enhanced teacher's labelled + A): only the rest is computed.
    """
    features = _onnx_trunk(trunk, size, crops[:batch])

    def views(chunk: np.ndarray) -> torch.Tensor:
        x = to_input(chunk, size).numpy()
        return torch.stack([features(x), features(x[..., ::-1].copy())], 1).half()

    first = views(crops[:1])
    start = 0
    if known is not None and 0 < len(known) <= len(crops):
        if not torch.allclose(first.float(), known[:1].float(), atol=1e-2):
            raise ValueError("cached trunk views do not belong to these faces")
        start = len(known)
    # filled in place: a list of chunks joined at the end held every view twice (set B's
    # views of the CPU recipe are 4 GB)
    out = torch.empty((len(crops), *first.shape[1:]), dtype=first.dtype)
    if start:
        out[:start] = known
    for i in tqdm(range(start, len(crops), batch), desc=desc, disable=desc is None,
                  leave=False):
        out[i:i + batch] = views(crops[i:i + batch])
    return out


def _onnx_trunk(trunk: nn.Module, size: int, check: np.ndarray
                ) -> Callable[[np.ndarray], torch.Tensor]:
    """The frozen trunk through ONNX Runtime: 1.7x torch's speed on 2 CPU cores (13.6
    against 22.9 ms per view, SFace to layer 73), checked against torch before use."""
    from fiqa_gate_training.export import graph_session

    session = graph_session(trunk, size, "features")

    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x})[0])

    x = to_input(check, size)
    with torch.no_grad():
        want = trunk(x)
    diff = float((features(x.numpy()) - want).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"ONNX trunk differs from torch by {diff:.2e}")
    return features


Validator = Callable[[QualityNet], float]


class WeightAverage:
    """An exponential moving average of a model's weights and float buffers (BatchNorm's
    running statistics must follow the averaged weights); integer buffers are copied.
    The decay ramps up as (1 + step) / (10 + step) so the random start fades quickly."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        keep = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1 - keep)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            if mine.is_floating_point():
                mine.lerp_(theirs, 1 - keep)
            else:
                mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])


class StackedViews:
    """Several [M_i, 2, C, h, w] view tensors indexed as one, rows numbered part after part,
    without the copy (and twice the memory) of `torch.cat`."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])
        self.shape = (int(self.ends[-1]), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor | int]) -> torch.Tensor:
        rows, flips = key
        flips = torch.as_tensor(flips).expand(len(rows))
        out = torch.empty((len(rows), *self.shape[2:]), dtype=self.parts[0].dtype)
        start = 0
        for part, end in zip(self.parts, self.ends, strict=True):
            here = (rows >= start) & (rows < int(end))
            if here.any():
                out[here] = part[rows[here] - start, flips[here]]
            start = int(end)
        return out


def hint_stages(backbone: nn.Module) -> nn.Sequential:
    """The backbone's stages: timm calls them `stages` (EdgeNeXt) or `blocks` (MobileNets)."""
    for name in ("stages", "blocks"):
        if isinstance(getattr(backbone, name, None), nn.Sequential):
            return getattr(backbone, name)
    raise ValueError("student.hint needs a timm backbone with stages (EdgeNeXt, MobileNet, ...)")


def hint_map(model: QualityNet, stage: int) -> torch.Tensor:
    """The backbone's map at stage `stage` on a 64 px probe (the model set to eval): the
    map the hint is taken from. IndexError for a stage the net does not have; a net of
    fixed input size (ViT, Swin) fails on the probe; ValueError for output that is no
    [N, C, H, W] map."""
    stages = hint_stages(model.backbone)
    if not -len(stages) <= stage < len(stages):
        raise IndexError(f"{len(stages)} stages: 0 to {len(stages) - 1}, or -1 for the last")
    maps: list[Any] = []
    hook = stages[stage].register_forward_hook(lambda _m, _i, out: maps.append(out))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 64, 64))
    finally:
        hook.remove()
    if not maps or not isinstance(maps[0], torch.Tensor) or maps[0].dim() != 4:
        raise ValueError(f"stage {stage} gives no feature map [N, C, H, W] for the hint")
    return maps[0]


class TrunkHint(nn.Module):
    """Feature distillation from the teacher's frozen face-pretrained trunk (a FitNets hint).

    The student learns its quality score from a few dozen people; the SFace trunk has seen
    thousands. Besides the score, the student's map at backbone stage `stage` (pooled to
    the trunk's grid) is asked to predict, through a 1x1 conv, the trunk's map projected on
    its `components` leading principal directions, each standardised. That passes on what
    a face network sees at each location without asking the student to reproduce all of
    it (validation EDC of 8-epoch students with and without it: README, "Train").
    Training only: the conv is dropped, so the exported student is unchanged in size.

    `views` are the cached trunk outputs [M, 2 (as is, mirrored), C, h, w]; `rows` maps
    each training face to its row there, or -1 where the trunk was never run (set B).
    """

    def __init__(self, model: QualityNet, views: torch.Tensor, rows: np.ndarray,
                 spec: dict[str, Any]) -> None:
        super().__init__()
        self.views, self.rows = views, torch.as_tensor(rows, dtype=torch.long)
        self.weight = float(spec["weight"])
        sample = torch.as_tensor(rows[rows >= 0])
        sample = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))
                        [:2000]]
        grid = views[sample, 0].float().permute(0, 2, 3, 1).reshape(-1, views.shape[2])
        mean = grid.mean(0)
        basis = torch.linalg.svd(grid - mean, full_matrices=False)[2][:int(spec["components"])].T
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("scale", ((grid - mean) @ basis).std(0))
        stage = int(spec.get("stage", 2))
        self._feature: torch.Tensor | None = hint_map(model, stage)
        self._hook = hint_stages(model.backbone)[stage].register_forward_hook(
            lambda _m, _i, out: setattr(self, "_feature", out))
        self.project = nn.Conv2d(self._feature.shape[1], basis.shape[1], 1)

    def loss(self, idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor | None:
        """The hint loss of the faces `idx` (views `flips`) just seen by the student."""
        rows = self.rows[idx]
        has = rows >= 0
        if not has.any() or self._feature is None:
            return None
        want = self.views[rows[has], flips[has]].float().permute(0, 2, 3, 1)
        want = (((want - self.mean) @ self.basis) / self.scale).permute(0, 3, 1, 2)
        got = nn.functional.adaptive_avg_pool2d(self._feature[has], want.shape[-2:])
        return self.weight * nn.functional.mse_loss(self.project(got), want)

    def close(self) -> None:
        self._hook.remove()


def schedule(opt: torch.optim.Optimizer, spec: dict[str, Any], epochs: int,
             steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once a batch: the paper's step decay, or a
    one-cycle cosine with a 10 % warm-up."""
    if spec.get("schedule", "cosine") == "step":  # the paper: x decay_ratio every decay_epochs
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec["decay_epochs"] *
                                               steps_per_epoch, gamma=spec["decay_ratio"])
    total = epochs * steps_per_epoch
    if total < 3:  # too short for a warm-up and a decay: a constant rate
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # a warm-up of two steps at least: torch divides by zero on one (ten steps at 10 %)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec["lr"], total_steps=total,
        pct_start=0.1 if total >= 20 else 2.0 / total, anneal_strategy="cos")


def fit(model: QualityNet, crops: np.ndarray, targets: np.ndarray, spec: dict[str, Any],
        checkpoint: Path, desc: str, val: Validator | None = None,
        views_file: Path | None = None,
        hint: tuple[torch.Tensor, np.ndarray] | None = None) -> QualityNet:
    """Train `model` in place on (crops, targets); resumes from `checkpoint` if present.

    `views_file` keeps the frozen trunk's outputs: the next network with the same trunk
    whose faces start with these reuses them (the trunk is the slow part on a CPU).

    With `val` (a model's figure of merit on held-out identities, higher is better) and
    `select_on_val` in the spec, the weights of the best epoch are kept: a from-scratch
    student overfits two dozen training identities long before its loss stops falling.
    With `ema` (a decay, e.g. 0.998) the weights validated and kept are an exponential
    moving average of the trained ones: smoother than any single step's.
    With `hint` in the spec, `hint` = (trunk views, row of each face) adds `TrunkHint`.
    """
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    size = int(spec["input_size"])
    trunk, tail = split(model, int(spec.get("freeze", 0)))
    if trunk is None:
        def batch_input(idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
            return pixel_batch(crops, idx, flips, size)
    else:
        known = None
        if views_file is not None and views_file.exists():
            known = torch.load(views_file, weights_only=True)
        views = make_views(trunk, crops, size, desc=f"{desc}: frozen features", known=known)
        if views_file is not None and (known is None or len(views) > len(known)):
            save_whole(lambda f: torch.save(views, f), views_file)

        def batch_input(idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
            return views[idx, flips].float()
    y = torch.as_tensor(targets, dtype=torch.float32)
    params = [p for p in tail.parameters() if p.requires_grad]
    # the average copies the model before the hint hooks into it
    ema = WeightAverage(model, float(spec["ema"])) if spec.get("ema") else None
    teach: TrunkHint | None = None
    if spec.get("hint"):
        if hint is None:
            raise ValueError(f"{desc}: the spec asks for a hint but no trunk views were given")
        teach = TrunkHint(model, *hint, spec["hint"])
        params += list(teach.project.parameters())
        log.info("%s: hint from the frozen trunk on %d of %d faces", desc,
                 int((teach.rows >= 0).sum()), len(y))
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    epochs = int(spec["epochs"])
    steps_per_epoch = math.ceil(len(y) / spec["batch_size"])
    sched = schedule(opt, spec, epochs, steps_per_epoch)
    start = 0
    select = val is not None and spec.get("select_on_val", False)
    best: dict[str, Any] = {"score": -np.inf, "epoch": 0, "model": None}
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
        best = state.get("best", best)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if teach is not None:
            teach.load_state_dict(state["hint"])
        if state.get("rng") is not None:  # drop-path draws from it: resume as if never cut
            torch.set_rng_state(state["rng"])
        log.info("%s: resumed after epoch %d", desc, start)
    max_steps = spec.get("max_steps")  # tests: prove the code path, not the result
    for epoch in range(start, epochs):
        tail.train()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(y), generator=gen)
        flips = torch.randint(0, 2, (len(y),), generator=gen)
        total, t0 = 0.0, time.time()
        bar = tqdm(range(0, len(y), spec["batch_size"]), desc=f"{desc} {epoch + 1}/{epochs}",
                   leave=False)
        for step, i in enumerate(bar):
            idx = order[i:i + spec["batch_size"]]
            if len(idx) < 2:
                continue  # PLCC needs two samples
            x = batch_input(idx, flips[idx])
            loss = quality_loss(tail(x), y[idx])
            extra = teach.loss(idx, flips[idx]) if teach is not None else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            value = loss.item()
            total += value * len(idx)
            bar.set_postfix(loss=f"{value:.4f}")
            if max_steps is not None and step + 1 >= max_steps:
                break
        note = ""
        if select:
            kept = ema.model if ema is not None else model
            score = val(kept)
            if score > best["score"]:
                best = {"score": score, "epoch": epoch + 1,
                        "model": {k: v.clone() for k, v in kept.state_dict().items()}}
            note = f", validation {score:.4f} (best {best['score']:.4f} @ {best['epoch']})"
        log.info("%s epoch %d/%d: loss %.4f (%.0f s)%s", desc, epoch + 1, epochs,
                 total / len(y), time.time() - t0, note)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "epoch": epoch + 1, "best": best,
                 "ema": ema.state_dict() if ema is not None else None,
                 "hint": teach.state_dict() if teach is not None else None,
                 "rng": torch.get_rng_state()}
        save_whole(lambda f, state=state: torch.save(state, f), checkpoint)
        if max_steps is not None:
            break
    if teach is not None:
        teach.close()
    if select and best["model"] is not None:
        model.load_state_dict(best["model"])
        log.info("%s: kept epoch %d (validation %.4f)", desc, best["epoch"], best["score"])
    elif ema is not None:
        model.load_state_dict(ema.model.state_dict())
    model.eval()
    return model


def views_belong_to(trunk: nn.Module, crops: np.ndarray, views: torch.Tensor, row: int,
                    size: int) -> bool:
    """Whether cached view `row` is the trunk's output on the first of `crops`."""
    with torch.no_grad():
        first = trunk(to_input(crops[:1], size))
    return torch.allclose(first, views[row:row + 1, 0].float(), atol=1e-2)


def predict_views(model: QualityNet, spec: dict[str, Any], crops: np.ndarray, path: Path,
                  offset: int, batch: int = 256) -> np.ndarray | None:
    """`model` on `crops` through the frozen features cached at `path[offset:]` (unmirrored
    views), or None when the cache does not cover these faces."""
    trunk, tail = split(model, int(spec.get("freeze", 0)))
    if trunk is None:
        return None
    views = torch.load(path, weights_only=True, mmap=True)  # read only the slice used
    if len(views) < offset + len(crops) or len(crops) == 0:
        return None
    if not views_belong_to(trunk, crops, views, offset, int(spec["input_size"])):
        return None
    with torch.no_grad():
        tail.eval()
        out = [tail(views[i:i + batch, 0].float()).numpy()
               for i in range(offset, offset + len(crops), batch)]
    return np.concatenate(out)[:len(crops)].astype(np.float64)


def predict(model: QualityNet, crops: np.ndarray, size: int, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            out.append(model(to_input(crops[i:i + batch], size)).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
