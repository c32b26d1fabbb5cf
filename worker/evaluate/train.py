"""Train ConvNet on a distilled set and score it on real test images, N times.

The protocol of the dataset-distillation benchmarks (DC/DSA/DM, and the ECCV 2024 challenge):
ConvNet-3 of width 128 with instance norm, SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
batch 256, 1000 epochs with the learning rate divided by 10 at the midpoint, DSA augmentation
on every batch, inputs normalised with the dataset's mean and std; top-1 accuracy on the test
set after the last epoch, reported over several runs (mean and population std, as the
reference code's ``np.std``).
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from worker.evaluate import dsa
from worker.evaluate.data import (
    EvaluationError,
    Normalization,
    TestSet,
    TrainSet,
    check_class_order,
    load_archive,
    load_testset,
    normalization,
    testset_folders,
)
from worker.evaluate.network import ConvNet
from worker.outputs.soft_labels import read as read_soft_labels

Profile = Literal["full", "fast"]
Labels = Literal["hard", "soft"]


@dataclass(frozen=True)
class Hyper:
    """Training settings of one protocol profile."""

    epochs: int
    runs: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    test_batch_size: int = 256
    depth: int = 3
    width: int = 128


#: ``full`` is the published protocol; ``fast`` is a smoke check, not a comparable number.
PROFILES: dict[str, Hyper] = {
    "full": Hyper(epochs=1000, runs=3),
    "fast": Hyper(epochs=50, runs=1),
}


@dataclass(frozen=True)
class Progress:
    """Where an evaluation is: handed to the ``progress`` callback after every epoch."""

    run: int  # 1-based
    runs: int
    epoch: int  # epochs finished in this run
    epochs: int
    loss: float  # mean training loss of the last epoch
    accuracy: float | None = None  # set once, when the run has been tested

    @property
    def fraction(self) -> float:
        """Share of all training epochs done, 0..1."""
        return ((self.run - 1) * self.epochs + self.epoch) / (self.runs * self.epochs)


ProgressCallback = Callable[[Progress], None]


@dataclass
class EvaluationResult:
    """What one evaluation measured; accuracies are fractions in [0, 1]."""

    accuracies: list[float]
    mean: float
    std: float
    protocol: dict[str, Any]
    class_check: str
    seconds: float
    seconds_per_epoch: float
    device: str
    seeds: list[int] = field(default_factory=list)
    #: What the reported runs trained on: hard (the class index) or soft (the archive's
    #: soft_labels.pt); a soft evaluation also reports the hard-label runs here.
    labels: str = "hard"
    hard: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when present, else the CPU; ``EvaluationError`` for a
    device name torch does not know or CUDA asked for where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise EvaluationError(f"unknown device {device!r}: {exc}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} asked for, but CUDA is not available")
    return chosen


def _normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    m = torch.tensor(norm.mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(norm.std, device=images.device).view(1, 3, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


def build_model(num_classes: int, image_size: int, hyper: Hyper, seed: int) -> ConvNet:
    """A freshly initialised ConvNet; the seed decides the weights, global RNG is left as is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvNet(num_classes, image_size=image_size, depth=hyper.depth, width=hyper.width)


@torch.inference_mode()
def accuracy(
    model: torch.nn.Module,
    test: TestSet,
    norm: Normalization,
    device: torch.device,
    *,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy on ``test``, in batches (uint8 stays on the host until each batch)."""
    model.eval()
    correct = 0
    for start in range(0, len(test.labels), batch_size):
        images = _normalize(test.images[start : start + batch_size].to(device), norm)
        labels = test.labels[start : start + batch_size].to(device)
        correct += int((model(images).argmax(dim=1) == labels).sum())
    return correct / len(test.labels)


def train_once(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    hyper: Hyper,
    *,
    seed: int,
    use_dsa: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    soft: SoftTargets | None = None,
) -> float:
    """Train ``model`` in place on normalised ``images`` (already on the model's device);
    returns the last epoch's mean loss.

    With ``soft``, the loss is the KL divergence from the teacher's probabilities at the
    temperature to the network's, times the temperature squared (Hinton et al.; the
    soft-label papers' loss); else cross-entropy on ``labels``. Shuffling and DSA draw from
    one CPU generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay
    )
    decay_at = hyper.epochs // 2
    count = len(labels)
    model.train()
    mean_loss = float("nan")
    for epoch in range(hyper.epochs):
        if epoch == decay_at and decay_at > 0:
            for group in optimizer.param_groups:
                group["lr"] = hyper.lr * 0.1
        order = torch.randperm(count, generator=generator).to(images.device)
        # Summed on the device: reading a loss per batch would wait for the GPU every batch.
        total = torch.zeros((), device=images.device)
        for start in range(0, count, hyper.batch_size):
            index = order[start : start + hyper.batch_size]
            batch = images[index]
            if use_dsa:
                batch = dsa.augment(batch, generator)
            if soft is None:
                loss = F.cross_entropy(model(batch), labels[index])
            else:
                loss = soft.loss(model(batch), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.detach() * len(index)
        mean_loss = float(total) / count
        if on_epoch is not None:
            on_epoch(epoch + 1, mean_loss)
    return mean_loss


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's probabilities at ``temperature`` (N, C), row ``i`` for training image
    ``i``, on the images' device."""

    probabilities: torch.Tensor
    temperature: float

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float) -> SoftTargets:
        return cls(F.softmax(logits.to(torch.float32) / temperature, dim=1), temperature)

    def loss(self, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p = F.log_softmax(outputs / t, dim=1)
        return F.kl_div(log_p, self.probabilities[index], reduction="batchmean") * (t * t)


def hyper_for(profile: str, *, epochs: int | None, runs: int | None) -> Hyper:
    """The profile's settings with explicit epochs/runs taking precedence."""
    if profile not in PROFILES:
        raise EvaluationError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    base = PROFILES[profile]
    epochs = base.epochs if epochs is None else epochs
    runs = base.runs if runs is None else runs
    if epochs < 1 or runs < 1:
        raise EvaluationError("epochs and runs must be at least 1")
    return replace(base, epochs=epochs, runs=runs)


def run_protocol(
    train: TrainSet,
    test: TestSet,
    *,
    hyper: Hyper,
    norm: Normalization,
    device: torch.device,
    seed: int = 0,
    use_dsa: bool = True,
    progress: ProgressCallback | None = None,
    soft_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[list[float], list[int], float]:
    """Accuracy of each of ``hyper.runs`` runs (seeds ``seed``, ``seed + 1``, ...), the seeds,
    and the training seconds per epoch (testing excluded)."""
    if train.image_size != test.image_size:
        raise EvaluationError(
            f"the archive's images are {train.image_size[1]}x{train.image_size[0]} but the "
            f"test images are {test.image_size[1]}x{test.image_size[0]}"
        )
    height, width = train.image_size
    if height != width:
        raise EvaluationError(f"images must be square, not {width}x{height}")
    if height % 2**hyper.depth:
        raise EvaluationError(
            f"ConvNet-{hyper.depth} halves the image {hyper.depth} times: {height} px does not "
            f"divide by {2**hyper.depth}"
        )
    images = _normalize(train.images.to(device), norm)
    labels = train.labels.to(device)
    soft = (
        SoftTargets.from_logits(soft_logits.to(device), temperature)
        if soft_logits is not None
        else None
    )
    accuracies: list[float] = []
    seeds = [seed + run for run in range(hyper.runs)]
    training = 0.0
    for run, run_seed in enumerate(seeds, start=1):
        model = build_model(len(train.classes), height, hyper, run_seed).to(device)

        def on_epoch(epoch: int, loss: float, run: int = run) -> None:
            if progress is not None:
                progress(Progress(run, hyper.runs, epoch, hyper.epochs, loss))

        started = time.perf_counter()
        loss = train_once(
            model,
            images,
            labels,
            hyper,
            seed=run_seed,
            use_dsa=use_dsa,
            on_epoch=on_epoch,
            soft=soft,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the time is the work's, not the queue's
        training += time.perf_counter() - started
        score = accuracy(model, test, norm, device, batch_size=hyper.test_batch_size)
        accuracies.append(score)
        if progress is not None:
            progress(Progress(run, hyper.runs, hyper.epochs, hyper.epochs, loss, score))
    return accuracies, seeds, training / (hyper.epochs * hyper.runs)


#: What an evaluation on soft labels says of its protocol, after its file and temperature.
SOFT_PROTOCOL = {
    "loss": "KL(teacher || network) of the softmaxes at the temperature, x T^2",
    "hard": "the same runs and seeds on the class indices, reported in hard",
}


def _shifted(
    progress: ProgressCallback | None, *, first: int, passes: int
) -> ProgressCallback | None:
    """``progress`` told of run ``first + r`` of ``runs x passes`` for each run ``r`` of one
    pass (an evaluation on soft labels makes two passes: hard, then soft)."""
    if progress is None:
        return None
    report = progress

    def shifted(p: Progress) -> None:
        report(replace(p, run=p.run + first, runs=p.runs * passes))

    return shifted


def evaluate(
    archive: Path,
    testset: Path,
    *,
    runs: int | None = None,
    epochs: int | None = None,
    profile: Profile = "full",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    use_dsa: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_test: bool = False,
    labels: Labels = "hard",
) -> EvaluationResult:
    """Evaluate the distilled set in ``archive`` on the real ImageFolder ``testset``.

    ``runs``/``epochs`` default to the profile's (full: 3 runs of 1000 epochs; fast: 1 of 50).
    ``device`` defaults to CUDA when present. ``mean``/``std`` override the normalisation
    (default: the archive's preset, else statistics of its images). Test images of another
    size are an error unless ``resize_test``, which resizes them to the archive's size.
    ``progress`` is called after every epoch; an exception it raises stops the evaluation
    (a job's cancel). Input problems raise ``EvaluationError`` (``ClassOrderError`` for
    classes in the wrong order) before any training.

    ``labels="soft"`` trains on the archive's ``soft_labels.pt`` (``SoftTargets``) and
    reports those runs, with the same runs on hard labels in ``hard``: a soft-label score is
    never mistaken for the challenge's, which trains on hard labels.
    """
    started = time.perf_counter()
    hyper = hyper_for(profile, epochs=epochs, runs=runs)
    target = resolve_device(device)
    train = load_archive(Path(archive))
    # Checked before the test images are decoded: a wrong order fails in a moment.
    class_check = check_class_order(train.classes, testset_folders(testset), wnids=train.wnids)
    test = load_testset(Path(testset), resize_to=train.image_size if resize_test else None)
    soft = soft_logits_for(Path(archive), train) if labels == "soft" else None
    norm = normalization(train, mean=mean, std=std)
    passes = 1 if soft is None else 2

    def reporter(offset: int) -> ProgressCallback | None:
        return _shifted(progress, first=offset * hyper.runs, passes=passes)

    run = partial(
        run_protocol, train, test, hyper=hyper, norm=norm, device=target, seed=seed, use_dsa=use_dsa
    )
    accuracies, seeds, per_epoch = run(progress=reporter(0))
    protocol = _protocol(profile, hyper, norm=norm, train=train, test=test, use_dsa=use_dsa)
    hard = None
    if soft is not None:
        hard = {
            "accuracies": accuracies,
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
        }
        accuracies, _, soft_per_epoch = run(
            progress=reporter(1), soft_logits=soft.logits, temperature=soft.temperature
        )
        per_epoch = (per_epoch + soft_per_epoch) / 2
        protocol["soft_labels"] = {
            "file": "soft_labels.pt",
            "temperature": soft.temperature,
            **SOFT_PROTOCOL,
        }
    return EvaluationResult(
        accuracies=accuracies,
        mean=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        protocol=protocol,
        class_check=class_check,
        seconds=time.perf_counter() - started,
        seconds_per_epoch=per_epoch,
        device=str(target),
        seeds=seeds,
        labels=labels,
        hard=hard,
    )


@dataclass(frozen=True)
class _Soft:
    logits: torch.Tensor
    temperature: float


def soft_logits_for(archive: Path, train: TrainSet) -> _Soft:
    """The archive's soft-label logits, row ``i`` for training image ``i``; EvaluationError
    when the archive has none or they do not match its images."""
    with zipfile.ZipFile(archive) as zf:
        try:
            soft = read_soft_labels(zf)
        except ValueError as exc:
            raise EvaluationError(f"labels soft: {exc}") from None
    if soft.classes != train.classes:
        raise EvaluationError("labels soft: soft_labels.pt names other classes than manifest.json")
    if train.files is None:
        # tensors.pt: class-major, each class in image order, as soft_labels.pt.
        if not torch.equal(soft.labels, train.labels):
            raise EvaluationError("labels soft: soft_labels.pt's rows are not tensors.pt's images")
        return _Soft(soft.logits, soft.temperature)
    row = {name: i for i, name in enumerate(soft.files)}
    missing = [f for f in train.files if f not in row]
    if missing or len(row) != len(train.files):
        first = missing[0] if missing else "(extra rows)"
        raise EvaluationError(f"labels soft: soft_labels.pt has no row for {first}")
    order = torch.tensor([row[f] for f in train.files], dtype=torch.int64)
    return _Soft(soft.logits[order], soft.temperature)


def _protocol(
    profile: Profile,
    hyper: Hyper,
    *,
    norm: Normalization,
    train: TrainSet,
    test: TestSet,
    use_dsa: bool,
) -> dict[str, Any]:
    """What the evaluation did, for the result: network, optimiser, data and metric."""
    counts = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
    return {
        "profile": profile,
        "epochs": hyper.epochs,
        "runs": hyper.runs,
        "network": {
            "name": f"ConvNet-{hyper.depth}",
            "depth": hyper.depth,
            "width": hyper.width,
            "norm": "instancenorm (GroupNorm, one group per channel, affine)",
            "pooling": "avgpool 2x2",
        },
        "optimizer": {
            "name": "SGD",
            "lr": hyper.lr,
            "momentum": hyper.momentum,
            "weight_decay": hyper.weight_decay,
            "lr_schedule": f"x0.1 at epoch {hyper.epochs // 2}",
        },
        "batch_size": hyper.batch_size,
        "test_batch_size": hyper.test_batch_size,
        "augmentation": f"DSA {dsa.STRATEGY}" if use_dsa else "none",
        "normalization": asdict(norm),
        "image_size": train.image_size[0],
        "classes": len(train.classes),
        "train_images": len(train.labels),
        "images_per_class": {"min": min(counts), "max": max(counts)},
        "train_source": train.source,
        "test_images": len(test.labels),
        "test_resized": test.resized,
        "metric": "top-1 accuracy on the test set after the last epoch",
    }
