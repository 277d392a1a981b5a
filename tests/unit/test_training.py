"""Unit tests for the training loop (clipopt_core.train.loop) and the stages (clipopt_core.train.tasks).

Everything runs on CPU with the tiny registered model ``clipopt-tiny`` (random init, seeded)
on the drawn-shape sources of ``tests/conftest.py``, or on a hand-computable toy task.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from clipopt_core.train import runner as pipeline
from clipopt_core.train.config import MiningConfig
from clipopt_core.train.mining import mine_captions, mining_spec
from clipopt_core.data.datasets import ImageDataset, encode_labels, train_transform
from clipopt_core.models.encode import embed_images
from clipopt_core.evaluate.protocol import caption_benchmark, validation_caption_t2i, validation_map
from clipopt_core.data.manifest import ingest, scan_source
from clipopt_core.models.loading import ClipBundle, ModelSpec, load_model
from clipopt_core.train.tasks import RealignTask, RetrievalTask
from clipopt_core.train.config import RealignConfig, RetrievalConfig
from clipopt_core.train.loop import LAST_DIR, clip_gradients, clip_groups, cosine_lr, fit, unscale_and_clip
from clipopt_core.train.config import TrainConfig

TINY = ModelSpec("clipopt-tiny")
MODEL_SEED = 1234


# ------------------------------------------------------------------ helpers / fixtures

@pytest.fixture(scope="module")
def shapes_rows(shapes_source: Path) -> pl.DataFrame:
    """The 48 validated rows (16 classes x 3) of the shapes source, with ``uri`` and ``image_id``."""
    return ingest(str(shapes_source), scan_source(str(shapes_source))).accepted


@pytest.fixture(scope="module")
def caption_rows(caption_source: Path) -> pl.DataFrame:
    frame = pl.read_csv(caption_source / "manifest.csv")
    return frame.with_columns((pl.lit(str(caption_source) + "/") + pl.col("path")).alias("uri"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def fresh_bundle(cache_dir: Path) -> ClipBundle:
    """A freshly built clipopt-tiny with the same (seeded) random weights every time."""
    torch.manual_seed(MODEL_SEED)
    return load_model(TINY, cache_dir=cache_dir)


def retrieval_task(cache_dir: Path, rows: pl.DataFrame, config: RetrievalConfig, *, validate: Any = None,
                   captions: tuple[torch.Tensor, list[list[int]]] | None = None, dropout: float = 0.0) -> RetrievalTask:
    bundle = fresh_bundle(cache_dir)
    bundle.model.visual.head.drop.p = dropout  # > 0 makes training draw from the global torch RNG
    ids, names = encode_labels(rows["label"].to_list())
    dataset = ImageDataset(rows["uri"].to_list(), ids,
                           train_transform(bundle.image_size, bundle.mean, bundle.std, bundle.interpolation))
    embeddings, owned = captions if captions else (None, None)
    task = RetrievalTask(bundle, dataset, len(names), config, validate or (lambda bundle: 0.0), embeddings, owned)
    return task


def realign_task(cache_dir: Path, image_embeddings: torch.Tensor, captions: list[str], config: RealignConfig, *,
                 validate: Any = None) -> RealignTask:
    bundle = fresh_bundle(cache_dir)
    return RealignTask(bundle, image_embeddings, captions, config, validate or (lambda bundle: 0.0))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


def one_step(tiny: float = 1e-2, **overrides: Any) -> TrainConfig:
    """Config for exactly one optimizer step (no weight decay so untouched tensors cannot drift)."""
    settings = dict(epochs=1, batch_size=8, lr=tiny, lr_floor=0.0, weight_decay=0.0, precision="fp32",
                    max_steps=1, eval_every_steps=1000, checkpoint_every_steps=1000, grad_clip=1e9,
                    validate_at_start=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def bn_prefixes(model: nn.Module) -> list[str]:
    return [f"visual.{name}" for name, layer in model.visual.named_modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm)]


class Crash(RuntimeError):
    """Raised from the log callback to simulate the process being killed mid-run."""


def crash_at(step: int):
    def log(event: dict[str, float]) -> None:
        if "lr" in event and event["step"] == step:
            raise Crash(f"simulated kill after optimizer step {step}")
    return log


def recorder(events: list[dict[str, float]]):
    return events.append


# ------------------------------------------------------------------ cosine_lr

def test_cosine_lr_hand_computed():
    # base 1.0 -> floor 0.1 over 4 steps: floor + 0.9 * 0.5 * (1 + cos(pi * step / 4))
    assert cosine_lr(1.0, 0.1, 0, 4) == pytest.approx(1.0)
    assert cosine_lr(1.0, 0.1, 1, 4) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # 0.868198
    assert cosine_lr(1.0, 0.1, 2, 4) == pytest.approx(0.55)  # the midpoint is the mean of base and floor
    assert cosine_lr(1.0, 0.1, 3, 4) == pytest.approx(0.1 + 0.45 * (1 - math.sqrt(0.5)))  # 0.231802
    assert cosine_lr(1.0, 0.1, 4, 4) == pytest.approx(0.1)
    assert cosine_lr(1.0, 0.1, 9, 4) == pytest.approx(0.1)  # past the end: stays at the floor
    assert cosine_lr(1e-6, 1e-7, 5, 10) == pytest.approx(5.5e-7)


def test_cosine_lr_floor_above_base_is_constant_base():
    # the floor is min(floor, base): a floor above the base never raises the LR
    for step in (0, 3, 7, 10):
        assert cosine_lr(0.01, 0.1, step, 10) == pytest.approx(0.01)


# ------------------------------------------------------------------ toy task (hand-computable)

class ToyTask:
    """One weight w (2 values, starts at 0); loss = w . a, so the gradient is ``a`` every step."""

    def __init__(self, a: tuple[float, float] = (3.0, 4.0), scores: list[float] | None = None,
                 steps_per_epoch: int = 10) -> None:
        self.linear = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.modules = nn.ModuleDict({"linear": self.linear})
        self.a = torch.tensor([a])
        self.scores = list(scores or [])
        self.seen: list[torch.Tensor] = []  # weights at each validation
        self.batches_drawn = 0
        self._steps = steps_per_epoch

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return [{"params": [self.linear.weight], "lr": config.lr, "weight_decay": config.weight_decay}]

    def steps_per_epoch(self, config: TrainConfig) -> int:
        return self._steps

    def batches(self, config: TrainConfig, epoch: int, start_step: int) -> Iterable[Any]:
        for _ in range(start_step, self._steps):
            self.batches_drawn += 1
            yield self.a

    def train_mode(self) -> None:
        self.linear.train()

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.linear(batch).sum(), {}

    def validate(self) -> float:
        self.seen.append(self.linear.weight.detach().clone())
        return self.scores.pop(0) if self.scores else 0.0


def toy_config(**overrides: Any) -> TrainConfig:
    settings = dict(epochs=1, batch_size=1, lr=0.1, lr_floor=0.1, weight_decay=0.0, precision="fp32",
                    eval_every_steps=1000, checkpoint_every_steps=1000, grad_clip=1e6, max_steps=1,
                    validate_at_start=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_gradient_clipping_hand_computed(tmp_path: Path):
    # gradient a = (3, 4), |a| = 5.  clip 1.0 -> a * 1 / (5 + 1e-6) (torch's clip coefficient)
    events: list[dict[str, float]] = []
    task = ToyTask()
    fit(task, toy_config(grad_clip=1.0), tmp_path / "clip1", log=recorder(events))
    assert events[0]["grad_norm"] == pytest.approx(5.0)  # the norm *before* clipping is reported
    grad = task.linear.weight.grad[0]
    assert grad.tolist() == pytest.approx([3 / (5 + 1e-6), 4 / (5 + 1e-6)], rel=1e-5)

    # clip 1e-10: AdamW's first step is lr * g / (|g| + eps) per element -> bounded by lr * clip / eps
    task = ToyTask()
    fit(task, toy_config(grad_clip=1e-10), tmp_path / "tiny", log=recorder(events))
    g = [3e-10 / 5, 4e-10 / 5]
    expected = [-0.1 * x / (x + 1e-8) for x in g]  # -5.9642e-4, -7.9365e-4
    assert task.linear.weight[0].tolist() == pytest.approx(expected, rel=1e-3)
    assert task.linear.weight.norm().item() <= 0.1 * 1e-10 / 1e-8

    # no effective clipping: the step is ~lr on each element
    task = ToyTask()
    fit(task, toy_config(grad_clip=1e6), tmp_path / "none")
    assert task.linear.weight[0].tolist() == pytest.approx([-0.1, -0.1], rel=1e-6)


def test_no_clipping_when_grad_clip_is_none(tmp_path: Path):
    events: list[dict[str, float]] = []
    task = ToyTask()
    fit(task, toy_config(grad_clip=None), tmp_path, log=recorder(events))
    assert events[0]["grad_norm"] == pytest.approx(5.0)  # still reported
    assert task.linear.weight.grad[0].tolist() == [3.0, 4.0]  # untouched
    assert task.linear.weight[0].tolist() == pytest.approx([-0.1, -0.1], rel=1e-6)


@pytest.mark.parametrize("settings,match", [({"grad_clip": 0.0}, "grad_clip"), ({"clip_mode": "scaled"}, "clip_mode")])
def test_bad_clipping_settings_fail_clearly(tmp_path: Path, settings: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        fit(ToyTask(), toy_config(**settings), tmp_path)


def _with_grads(*grads: tuple[float, ...]) -> list[nn.Parameter]:
    params = []
    for grad in grads:
        param = nn.Parameter(torch.zeros(len(grad)))
        param.grad = torch.tensor(grad)
        params.append(param)
    return params


def test_clip_gradients_clips_each_group_on_its_own():
    tower, proxies = _with_grads((3.0, 4.0)), _with_grads((0.3, 0.4))  # norms 5 and 0.5
    norm = clip_gradients([tower, proxies], 1.0)
    assert norm == pytest.approx(math.sqrt(25 + 0.25))  # the true norm before clipping
    assert tower[0].grad.norm().item() == pytest.approx(1.0, rel=1e-5)  # clipped to 1 on its own
    assert proxies[0].grad.tolist() == pytest.approx([0.3, 0.4])  # below 1: untouched (global clipping would scale it)
    # None clips nothing but still reports the norm
    tower = _with_grads((3.0, 4.0))
    assert clip_gradients([tower], None) == pytest.approx(5.0) and tower[0].grad.tolist() == [3.0, 4.0]


def test_clip_gradients_on_scaled_gradients_is_the_authors_threshold():
    scale = 1024.0
    # the authors' fp16 form: gradients still carry the GradScaler's factor when clipped to 1
    scaled = _with_grads((3.0 * scale, 4.0 * scale))
    assert clip_gradients([scaled], 1.0, scale) == pytest.approx(5.0)  # reported in true units
    true_after = scaled[0].grad / scale  # what the optimizer sees once the scaler unscales
    assert true_after.norm().item() == pytest.approx(1.0 / scale, rel=1e-5)  # effective threshold 1/scale
    # unscaled first (clip_mode="unscaled"): the true gradient is clipped to norm 1
    unscaled = _with_grads((3.0, 4.0))
    clip_gradients([unscaled], 1.0, 1.0)
    assert unscaled[0].grad.norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("mode,true_norm_after", [("unscaled", 1.0), ("authors", 1.0 / 1024)])
def test_unscale_and_clip_with_a_grad_scaler(mode: str, true_norm_after: float):
    # a real GradScaler (CPU) at scale 1024; the tower gradient is (3, 4), the proxy gradient (0, 0.0001)
    tower, proxies = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [tower]}, {"params": [proxies]}], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(tower @ torch.tensor([3.0, 4.0]) + proxies @ torch.tensor([0.0, 1e-4])).backward()
    norm = unscale_and_clip(optimizer, scaler, 1.0, mode)
    assert norm == pytest.approx(math.sqrt(25 + 1e-8), rel=1e-5)  # always the true norm before clipping
    scaler.step(optimizer)  # unscales in "authors" mode; SGD at lr 1 moves each weight by minus its gradient
    assert tower.norm().item() == pytest.approx(true_norm_after, rel=1e-4)
    assert proxies.tolist() == pytest.approx([0.0, -1e-4], rel=1e-4)  # its own group: far below both bounds


def test_clip_groups_follow_param_groups_and_shared_keys():
    a, b, c = _with_grads((1.0,), (2.0,), (3.0,))
    separate = torch.optim.AdamW([{"params": [a]}, {"params": [b, c]}])
    assert [[id(p) for p in group] for group in clip_groups(separate)] == [[id(a)], [id(b), id(c)]]
    shared = torch.optim.AdamW([{"params": [a], "clip_group": "text"}, {"params": [b], "clip_group": "text"},
                                {"params": [c]}])
    assert [[id(p) for p in group] for group in clip_groups(shared)] == [[id(a), id(b)], [id(c)]]


class TwoGroupToyTask(ToyTask):
    """Two weights in two parameter groups, each with gradient ``a``; counts ``after_step`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.other = nn.Linear(2, 1, bias=False)
        nn.init.zeros_(self.other.weight)
        self.modules = nn.ModuleDict({"linear": self.linear, "other": self.other})
        self.after_steps: list[float] = []

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return [{"params": [self.linear.weight], "lr": config.lr, "weight_decay": 0.0},
                {"params": [self.other.weight], "lr": config.lr, "weight_decay": 0.0}]

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.linear(batch).sum() + self.other(batch).sum(), {}

    def after_step(self) -> None:
        self.after_steps.append(self.linear.weight[0, 0].item())  # after the optimizer moved it


@pytest.mark.parametrize("clip_mode", ["unscaled", "authors"])
def test_fit_clips_per_group_and_calls_after_step(tmp_path: Path, clip_mode: str):
    task = TwoGroupToyTask()
    events: list[dict[str, float]] = []
    fit(task, toy_config(grad_clip=1.0, clip_mode=clip_mode, max_steps=3), tmp_path, log=recorder(events))
    # each group's norm 5 is clipped to 1 on its own (global clipping would give 1/sqrt(2) each);
    # without a GradScaler (CPU) the authors' mode is the same
    for weight in (task.linear.weight, task.other.weight):
        assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert events[0]["grad_norm"] == pytest.approx(5.0 * math.sqrt(2))
    assert len(task.after_steps) == 3 and task.after_steps[0] == pytest.approx(-0.1, rel=1e-5)


def test_lr_follows_cosine_schedule_per_step(tmp_path: Path):
    events: list[dict[str, float]] = []
    fit(ToyTask(steps_per_epoch=4), toy_config(lr=0.1, lr_floor=0.01, max_steps=None), tmp_path, log=recorder(events))
    lrs = [event["lr"] for event in events if "lr" in event]
    # 0.01 + 0.09 * 0.5 * (1 + cos(pi * s / 4)) for s = 0..3 (the LR used for step s+1)
    assert lrs == pytest.approx([0.1, 0.01 + 0.045 * (1 + math.sqrt(0.5)), 0.055, 0.01 + 0.045 * (1 - math.sqrt(0.5))])


def test_early_stopping_keeps_best_weights(tmp_path: Path):
    # validation every step; scores peak at the 2nd evaluation, then decrease; patience 2
    task = ToyTask(scores=[0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    result = fit(task, toy_config(max_steps=None, eval_every_steps=1, patience=2), tmp_path)
    assert result.stopped_early
    assert result.steps == 4  # evaluations at steps 1..4; 2 without improvement after step 2
    assert (result.best_step, result.best_score) == (2, 0.5)
    assert [event["val_score"] for event in result.history] == [0.1, 0.5, 0.4, 0.3]
    assert [event["best_score"] for event in result.history] == [0.1, 0.5, 0.5, 0.5]
    assert len(task.seen) == 4
    assert not torch.equal(task.seen[1], task.seen[3])  # the weights did move after the best step
    assert torch.equal(task.linear.weight.detach(), task.seen[1])  # modules hold the best-step weights
    assert torch.equal(load_file(str(tmp_path / "best.safetensors"))["linear.weight"], task.seen[1])

    # calling fit again on the same folder resumes the stopped run and trains no further
    again = ToyTask()
    result2 = fit(again, toy_config(max_steps=None, eval_every_steps=1, patience=2), tmp_path)
    assert result2.steps == 4 and result2.stopped_early and again.batches_drawn == 0
    assert torch.equal(again.linear.weight.detach(), task.seen[1])


# ------------------------------------------------------------------ resume equivalence

def _checkpoint_step(work_dir: Path) -> int:
    return json.loads((work_dir / LAST_DIR / "state.json").read_text())["state"]["step"]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def test_retrieval_resume_is_bit_identical(tmp_path: Path, shapes_rows: pl.DataFrame, cache_dir: Path):
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, precision="fp32", checkpoint_every_steps=2,
                         eval_every_steps=3, patience=100)
    rconfig = RetrievalConfig(train=config)
    validate = validation_map(shapes_rows.head(12))  # 4 classes x 3 images
    # dropout in the projector head: the run consumes the global RNG, so its checkpointed state must be exact

    full_events: list[dict[str, float]] = []
    task_a = retrieval_task(cache_dir, shapes_rows, rconfig, validate=validate, dropout=0.2)
    result_a = fit(task_a, config, tmp_path / "a", log=recorder(full_events))
    assert result_a.steps == 12  # 48 images // 8 = 6 steps/epoch, 2 epochs

    task_b = retrieval_task(cache_dir, shapes_rows, rconfig, validate=validate, dropout=0.2)
    with pytest.raises(Crash):
        fit(task_b, config, tmp_path / "b", log=crash_at(5))
    assert _checkpoint_step(tmp_path / "b") == 4  # step 5 ran in memory but was never saved

    resumed_events: list[dict[str, float]] = []
    task_c = retrieval_task(cache_dir, shapes_rows, rconfig, validate=validate, dropout=0.2)  # a fresh model, as after a restart
    result_c = fit(task_c, config, tmp_path / "b", log=recorder(resumed_events))
    assert resumed_events[0]["step"] == 5  # it resumed, it did not start over

    assert result_c.steps == result_a.steps
    assert (result_c.best_step, result_c.best_score) == (result_a.best_step, result_a.best_score)
    assert result_c.history == result_a.history
    assert [e["step"] for e in result_a.history] == [0, 3, 6, 9, 12]  # step 0 scores the starting weights
    # the resumed steps log exactly the losses / LRs / grad norms of the uninterrupted run
    assert resumed_events == [e for e in full_events if e["step"] >= 5]
    _assert_same_tensors(load_file(str(tmp_path / "a" / LAST_DIR / "modules.safetensors")),
                         load_file(str(tmp_path / "b" / LAST_DIR / "modules.safetensors")))
    _assert_same_tensors(load_file(str(tmp_path / "a" / LAST_DIR / "optimizer.safetensors")),
                         load_file(str(tmp_path / "b" / LAST_DIR / "optimizer.safetensors")))
    _assert_same_tensors(task_a.modules.state_dict(), task_c.modules.state_dict())  # best weights loaded at exit


def test_realign_resume_is_bit_identical(tmp_path: Path, caption_rows: pl.DataFrame, cache_dir: Path):
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, lr_floor=0.0, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6,
                         precision="fp32", checkpoint_every_steps=2, eval_every_steps=3, patience=100)
    rconfig = RealignConfig(train=config, last_blocks=1)
    embeddings = embed_images(fresh_bundle(cache_dir), caption_rows["uri"].to_list())
    captions = caption_rows["caption"].to_list()
    validate = validation_caption_t2i(embeddings[:12], caption_benchmark(caption_rows.head(12)))

    full_events: list[dict[str, float]] = []
    task_a = realign_task(cache_dir, embeddings, captions, rconfig, validate=validate)
    result_a = fit(task_a, config, tmp_path / "a", log=recorder(full_events))
    assert result_a.steps == 6  # 24 captions / 8 = 3 steps per epoch, 2 epochs

    task_b = realign_task(cache_dir, embeddings, captions, rconfig, validate=validate)
    with pytest.raises(Crash):
        fit(task_b, config, tmp_path / "b", log=crash_at(5))
    assert _checkpoint_step(tmp_path / "b") == 4

    resumed_events: list[dict[str, float]] = []
    task_c = realign_task(cache_dir, embeddings, captions, rconfig, validate=validate)
    result_c = fit(task_c, config, tmp_path / "b", log=recorder(resumed_events))
    assert resumed_events[0]["step"] == 5
    assert result_c.history == result_a.history
    assert (result_c.best_step, result_c.best_score, result_c.steps) == (result_a.best_step, result_a.best_score, 6)
    assert resumed_events == [e for e in full_events if e["step"] >= 5]
    _assert_same_tensors(load_file(str(tmp_path / "a" / LAST_DIR / "modules.safetensors")),
                         load_file(str(tmp_path / "b" / LAST_DIR / "modules.safetensors")))
    _assert_same_tensors(task_a.modules.state_dict(), task_c.modules.state_dict())


# ------------------------------------------------------------------ which parameters each stage trains

def _split_keys(model: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """(text-side state keys, BatchNorm state keys, other visual parameter names)."""
    state = model.state_dict()
    bn = {key for prefix in bn_prefixes(model) for key in state if key.startswith(prefix + ".")}
    text = {key for key in state if not key.startswith("visual.")}
    visual = {name for name, _ in model.named_parameters() if name.startswith("visual.") and name not in bn}
    return text, bn, visual


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keys: Iterable[str]) -> set[str]:
    return {key for key in keys if not torch.equal(before[key], after[key])}


@pytest.mark.parametrize("freeze_norm", [True, False])
def test_stage1_trains_image_tower_only(tmp_path: Path, shapes_rows: pl.DataFrame, cache_dir: Path, freeze_norm: bool):
    config = one_step()
    task = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config, freeze_norm=freeze_norm))
    model = task.bundle.model
    before, proxies = snapshot(model), task.arc.proxies.detach().clone()
    fit(task, config, tmp_path)
    after = snapshot(model)
    text, bn, visual = _split_keys(model)
    assert len(bn) > 0 and len(visual) > 0 and "logit_scale" in text
    assert _changed(before, after, text) == set()  # text tower and logit_scale bit-identical
    assert _changed(before, after, visual) == visual  # every non-BN image-tower parameter moved
    assert not torch.equal(proxies, task.arc.proxies.detach())
    running = {key for key in bn if key.endswith(("running_mean", "running_var"))}
    affine = {key for key in bn if key.endswith((".weight", ".bias"))}
    if freeze_norm:
        assert _changed(before, after, bn) == set()  # running stats, counters and affines untouched
    else:
        assert _changed(before, after, running) == running
        assert _changed(before, after, affine) == affine
        counters = [key for key in bn if key.endswith("num_batches_tracked")]
        assert all(int(after[key]) == int(before[key]) + 1 for key in counters)


def test_stage1_reattach_keeps_projector(tmp_path: Path, shapes_rows: pl.DataFrame, cache_dir: Path):
    config = one_step()
    task = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config, projector="reattach"))
    model = task.bundle.model
    head_before = {k: v.clone() for k, v in model.visual.head.state_dict().items()}
    assert task.arc.proxies.shape[1] == 256  # proxies live in the trunk's (pre-projection) feature space
    before = snapshot(model)
    fit(task, config, tmp_path)
    after = snapshot(model)
    text, bn, visual = _split_keys(model)
    for key, value in model.visual.head.state_dict().items():
        assert torch.equal(head_before[key], value), key
    trunk = {key for key in visual if key.startswith("visual.trunk.")}
    assert _changed(before, after, trunk) == trunk
    assert _changed(before, after, text | bn) == set()


def test_mcip_trains_image_tower_with_caption_term(tmp_path: Path, shapes_rows: pl.DataFrame, caption_rows: pl.DataFrame,
                                                   cache_dir: Path):
    pool = caption_rows["caption"].to_list() + [f"a {label}" for label in shapes_rows["label"].unique().to_list()]
    table, stats = mine_captions(fresh_bundle(cache_dir), shapes_rows, pool,
                                          MiningConfig(top_k=3, threshold=-1.0))
    assert table.height == 3 * shapes_rows.height and stats["images_without_captions"] == 0
    captions = pipeline._caption_matrix(fresh_bundle(cache_dir), shapes_rows, table, "cpu")
    assert all(len(rows) == 3 for rows in captions[1])

    config = one_step()
    events: list[dict[str, float]] = []
    task = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config, mc_weight=0.25), captions=captions)
    model = task.bundle.model
    before = snapshot(model)
    fit(task, config, tmp_path / "mcip", log=recorder(events))
    after = snapshot(model)
    text, bn, visual = _split_keys(model)
    assert _changed(before, after, text | bn) == set()  # frozen text tower, frozen norms
    assert _changed(before, after, visual) == visual
    step = events[0]
    assert step["mc"] > 0 and step["captioned"] == 1.0
    assert step["loss"] == pytest.approx(0.75 * step["arc"] + 0.25 * step["mc"], rel=1e-5)

    # the caption term changes the update: stage 1 from the same start lands elsewhere
    plain = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config))
    fit(plain, config, tmp_path / "stage1")
    assert not torch.equal(plain.bundle.model.visual.head.proj.weight, model.visual.head.proj.weight)


def test_mcip_requires_captions(shapes_rows: pl.DataFrame, cache_dir: Path):
    with pytest.raises(ValueError, match="caption"):
        retrieval_task(cache_dir, shapes_rows, RetrievalConfig(mc_weight=0.25))


def test_realign_trains_only_text_tail(tmp_path: Path, caption_rows: pl.DataFrame, cache_dir: Path):
    config = one_step(betas=(0.9, 0.98), eps=1e-6)
    embeddings = embed_images(fresh_bundle(cache_dir), caption_rows["uri"].to_list())
    task = realign_task(cache_dir, embeddings, caption_rows["caption"].to_list(), RealignConfig(train=config, last_blocks=1))
    model = task.bundle.model
    before, scale_before = snapshot(model), task.infonce.logit_scale.detach().clone()
    assert scale_before.item() == pytest.approx(model.logit_scale.item())  # InfoNCE starts from the model's scale
    fit(task, config, tmp_path)
    after = snapshot(model)
    tail = {key for key in after if key.startswith(("transformer.resblocks.1.", "ln_final.")) or key == "text_projection"}
    assert len(tail) == 12 + 2 + 1
    assert _changed(before, after, after.keys()) == tail  # visual, block 0, embeddings, logit_scale untouched
    assert not torch.equal(scale_before, task.infonce.logit_scale.detach())

    # finish() copies the learned (clamped) scale back into the model before export
    task.finish()
    assert model.logit_scale.exp().item() == pytest.approx(task.infonce.effective_scale().item(), rel=1e-6)


def test_realign_param_groups_split_weight_decay(cache_dir: Path):
    task = realign_task(cache_dir, torch.nn.functional.normalize(torch.randn(4, 32), dim=-1), list("abcd"),
                        RealignConfig(last_blocks=1))
    names = {id(p): n for n, p in task.bundle.model.named_parameters()}
    decay, no_decay = task.param_groups(TrainConfig(lr=1e-5, weight_decay=0.2))
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "text_projection",
        "transformer.resblocks.1.attn.in_proj_weight",
        "transformer.resblocks.1.attn.out_proj.weight",
        "transformer.resblocks.1.mlp.c_fc.weight",
        "transformer.resblocks.1.mlp.c_proj.weight",
    ]
    assert len(no_decay["params"]) == 10 + 1 and no_decay["params"][-1] is task.infonce.logit_scale


def test_realign_defaults_do_not_clip():
    assert RealignConfig().train.grad_clip is None
    assert RetrievalConfig().train.grad_clip == 1.0 and RetrievalConfig().train.clip_mode == "unscaled"


def test_realign_logit_scale_clamped_in_place_after_the_step(tmp_path: Path, caption_rows: pl.DataFrame, cache_dir: Path):
    config = one_step(betas=(0.9, 0.98), eps=1e-6, lr=1e-3)
    embeddings = embed_images(fresh_bundle(cache_dir), caption_rows["uri"].to_list())
    task = realign_task(cache_dir, embeddings, caption_rows["caption"].to_list(), RealignConfig(train=config))
    with torch.no_grad():
        task.infonce.logit_scale.fill_(math.log(200.0))  # above the clamp: exp(scale) = 200 >= 100
    events: list[dict[str, float]] = []
    fit(task, config, tmp_path, log=recorder(events))
    # the forward pass used the unclamped scale, so the gradient reached the parameter ...
    assert events[0]["logit_scale"] == pytest.approx(200.0, rel=1e-5)
    assert task.infonce.logit_scale.grad is not None and task.infonce.logit_scale.grad.item() != 0.0
    # ... and after the step the parameter itself sits on the clamp
    assert task.infonce.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)
    task.finish()
    assert task.bundle.model.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)


def test_mcip_max_negative_reaches_the_loss(shapes_rows: pl.DataFrame, cache_dir: Path):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(40, 32, generator=generator), dim=-1)
    owned = [[i % 40, (i + 7) % 40] if i % 3 else [] for i in range(shapes_rows.height)]  # a third without captions
    values = {}
    for form in ("authors", "hardest"):
        config = RetrievalConfig(train=one_step(), mc_weight=0.25, max_negative=form)
        task = retrieval_task(cache_dir, shapes_rows, config, captions=(embeddings, owned))
        assert task.multi_caption.max_negative == form
        task.train_mode()
        torch.manual_seed(0)
        _, stats = task.loss(next(iter(task.batches(config.train, 0, 0))))
        values[form] = stats["mc"]
    assert values["authors"] != pytest.approx(values["hardest"], rel=1e-3)


def test_proxy_dtype_reaches_the_arc_margin_loss(shapes_rows: pl.DataFrame, cache_dir: Path):
    values = {}
    for dtype in ("fp32", "bf16"):
        config = RetrievalConfig(train=one_step(), proxy_dtype=dtype)
        torch.manual_seed(0)  # the same proxies in both
        task = retrieval_task(cache_dir, shapes_rows, config)
        assert task.arc.proxy_dtype == dtype and task.arc.proxies.dtype == torch.float32  # fp32 master weights
        task.train_mode()
        torch.manual_seed(0)
        _, stats = task.loss(next(iter(task.batches(config.train, 0, 0))))
        values[dtype] = stats["arc"]
    assert values["bf16"] == pytest.approx(values["fp32"], rel=1e-2) and values["bf16"] != values["fp32"]


def test_mining_spec_defaults_to_the_base_model():
    base = ModelSpec("ViT-B-32", "laion2b_s34b_b79k", image_size=256)
    assert mining_spec(MiningConfig(), base) == base  # the base model, its image size included
    other = mining_spec(MiningConfig(model_name="ViT-L-14", model_pretrained="openai"), base)
    assert other == ModelSpec("ViT-L-14", "openai", image_size=None)  # its own input size
    assert mining_spec(MiningConfig(model_name="clipopt-tiny"), base) == ModelSpec("clipopt-tiny")
    with pytest.raises(ValueError, match="model_name"):
        mining_spec(MiningConfig(model_pretrained="openai"), base)


# ------------------------------------------------------------------ gradient norm and accumulation on the real model

def test_grad_norm_reported_is_the_true_norm(tmp_path: Path, shapes_rows: pl.DataFrame, cache_dir: Path):
    config = one_step(grad_clip=1.0)
    events: list[dict[str, float]] = []
    fit(retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config)), config, tmp_path, log=recorder(events))

    manual = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=config))
    manual.train_mode()
    batch = next(iter(manual.batches(config, 0, 0)))
    loss, _ = manual.loss(batch)
    loss.backward()
    params = [p for group in manual.param_groups(config) for p in group["params"]]
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    assert events[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert events[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0


def test_accumulation_matches_full_batch(tmp_path: Path, shapes_rows: pl.DataFrame, cache_dir: Path):
    # BatchNorm stays in eval mode (freeze_norm), so a batch of 8 == two micro-batches of 4
    full_config = one_step(lr=1e-3, batch_size=8, accumulation_steps=1)
    accum_config = one_step(lr=1e-3, batch_size=4, accumulation_steps=2)
    events: list[dict[str, float]] = []
    full = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=full_config))
    fit(full, full_config, tmp_path / "full", log=recorder(events))
    accum = retrieval_task(cache_dir, shapes_rows, RetrievalConfig(train=accum_config))
    fit(accum, accum_config, tmp_path / "accum", log=recorder(events))

    events = [event for event in events if "lr" in event]  # optimizer-step events (no validation events)
    assert len(events) == 2 and events[0]["step"] == events[1]["step"] == 1
    assert events[1]["loss"] == pytest.approx(events[0]["loss"], rel=1e-5)
    assert events[1]["grad_norm"] == pytest.approx(events[0]["grad_norm"], rel=1e-4)
    full_params = dict(full.modules.named_parameters())
    for name, param in accum.modules.named_parameters():
        if param.grad is not None:  # the accumulated gradient is the mean over all 8 images
            torch.testing.assert_close(param.grad, full_params[name].grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(param.detach(), full_params[name].detach(), rtol=0, atol=1e-5, msg=name)
