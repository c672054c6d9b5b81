"""The dynlab DataModules: shapes, splits, determinism, on-disk layouts and error messages."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynlab.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataInfo,
    DataRootError,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)
from dynlab.data.base import DynlabDataModule
from dynlab.data.fake import write_fake_cifar, write_fake_imagenet


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def assert_batch(batch: tuple[torch.Tensor, torch.Tensor], size: int, info: DataInfo) -> None:
    x, y = batch
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert tuple(x.shape) == (size, *info.input_size)
    assert y.shape == (size,) and y.min() >= 0 and y.max() < info.num_classes


def split_sizes(data: DynlabDataModule) -> tuple[int, int, int]:
    data.setup()
    assert data.splits is not None
    return len(data.splits.train), len(data.splits.val), len(data.splits.test)


def small_synthetic(**overrides: object) -> SyntheticDataModule:
    options = dict(num_train=300, num_test=100, val_size=50, batch_size=32, image_size=16)
    return SyntheticDataModule(**{**options, **overrides})


def test_synthetic_shapes_splits_and_info_before_loading() -> None:
    data = small_synthetic(channels=1, num_classes=5)
    assert data.info == DataInfo("synthetic", 5, (1, 16, 16))
    assert data.splits is None  # info did not load anything
    assert split_sizes(data) == (250, 50, 100)
    assert_batch(first_batch(data.train_dataloader()), 32, data.info)
    assert_batch(first_batch(data.val_dataloader()), 32, data.info)
    assert len(data.test_dataloader().dataset) == 100


def test_synthetic_is_deterministic_from_the_seed() -> None:
    a, b = all_batches(small_synthetic().train_dataloader())
    c, d = all_batches(small_synthetic().train_dataloader())
    assert torch.equal(a, c) and torch.equal(b, d)
    other, _ = all_batches(small_synthetic(seed=1).train_dataloader())
    assert not torch.equal(a, other)


def test_synthetic_is_learnable_within_an_epoch() -> None:
    data = SyntheticDataModule(batch_size=64)  # the defaults: 10 classes, 3x32x32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in data.train_dataloader():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    x, y = all_batches(data.test_dataloader())
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.4  # chance is 0.1; seeds 0-3 give 0.54-0.66


@pytest.mark.parametrize("channels", [1, 3])
def test_digits_shapes_and_fixed_splits(channels: int) -> None:
    data = DigitsDataModule(channels=channels, batch_size=64)
    assert data.info == DataInfo("digits", 10, (channels, 32, 32))
    assert split_sizes(data) == (1797 - 359 - 200, 200, 359)
    assert_batch(first_batch(data.train_dataloader()), 64, data.info)


def test_digits_splits_share_no_samples_and_test_is_seed_independent() -> None:
    data = DigitsDataModule(augment=False, channels=1)
    data.setup()
    rows = {
        name: {tuple(image.flatten().tolist()) for image, _ in split}
        for name, split in vars(data.splits).items()
    }
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    test_a = all_batches(data.test_dataloader())[0]
    test_b = all_batches(DigitsDataModule(channels=1, seed=5).test_dataloader())[0]
    assert torch.equal(test_a, test_b)


def test_digits_eval_inputs_are_normalised() -> None:
    x, _ = all_batches(DigitsDataModule(augment=False, val_size=500).train_dataloader())
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def read_pickle(path: Path) -> dict:
    with path.open("rb") as file:
        return pickle.load(file, encoding="bytes")


def test_cifar10_pixels_round_trip_from_the_pickles(tmp_path: Path) -> None:
    root = write_fake_cifar(tmp_path, num_classes=10, num_train=60, num_test=20)
    data = CIFAR10DataModule(root=str(root), val_size=10, batch_size=8)
    assert data.info == DataInfo("cifar10", 10, (3, 32, 32))
    assert split_sizes(data) == (50, 10, 20)

    test = read_pickle(root / "cifar-10-batches-py" / "test_batch")
    x, y = all_batches(data.test_dataloader())
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    pixels = ((x * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels.reshape(20, -1), torch.from_numpy(test[b"data"]))
    assert y.tolist() == test[b"labels"]

    batches = [read_pickle(root / "cifar-10-batches-py" / f"data_batch_{i}") for i in range(1, 6)]
    train_pixels = np.concatenate([batch[b"data"] for batch in batches])
    val_x, _ = all_batches(data.val_dataloader())
    val_pixels = ((val_x * std + mean) * 255).round().to(torch.uint8).reshape(10, -1)
    assert torch.equal(val_pixels, torch.from_numpy(train_pixels[data.splits.val.indices]))


def test_cifar_val_is_held_out_of_train_and_seeded(tmp_path: Path) -> None:
    root = str(write_fake_cifar(tmp_path, num_classes=10, num_train=60, num_test=5))
    data = CIFAR10DataModule(root=root, val_size=10)
    data.setup()
    train, val = set(data.splits.train.indices), set(data.splits.val.indices)
    assert not train & val and len(train | val) == 60
    again = CIFAR10DataModule(root=root, val_size=10)
    again.setup()
    assert again.splits.val.indices == data.splits.val.indices


def test_cifar100_reads_fine_labels_and_augments(tmp_path: Path) -> None:
    root = write_fake_cifar(tmp_path, num_classes=100, num_train=40, num_test=10)
    data = CIFAR100DataModule(root=str(root), val_size=8, batch_size=16)
    assert data.info.num_classes == 100
    _, y = all_batches(data.test_dataloader())
    assert y.tolist() == read_pickle(root / "cifar-100-python" / "test")[b"fine_labels"]

    plain = CIFAR100DataModule(root=str(root), val_size=8, batch_size=16, augment=False)
    augmented_x, augmented_y = first_batch(data.train_dataloader())
    plain_x, plain_y = first_batch(plain.train_dataloader())
    assert torch.equal(augmented_y, plain_y)  # same samples in the same order...
    assert not torch.equal(augmented_x, plain_x)  # ...but cropped and flipped
    assert_batch((augmented_x, augmented_y), 16, data.info)


def test_imagenet_folder_tree_loads(tmp_path: Path) -> None:
    root = str(write_fake_imagenet(tmp_path, num_classes=3, per_class_train=5, per_class_val=2))
    data = ImageNetDataModule(root=root, num_classes=3, image_size=32, val_size=3, batch_size=4)
    assert data.info == DataInfo("imagenet", 3, (3, 32, 32))
    assert split_sizes(data) == (12, 3, 6)
    assert_batch(first_batch(data.train_dataloader()), 4, data.info)
    _, test_labels = all_batches(data.test_dataloader())
    assert test_labels.tolist() == [0, 0, 1, 1, 2, 2]

    again = ImageNetDataModule(root=root, num_classes=3, image_size=32, val_size=3, batch_size=4)
    assert torch.equal(
        first_batch(data.train_dataloader())[0], first_batch(again.train_dataloader())[0]
    )


PAPER_RECIPE = {  # CondenseNetV2's ImageNet recipe (official train.py), SPOS's jitter on top
    "auto_augment": "rand-m9-mstd0.5",
    "re_prob": 0.2,
    "interpolation": "random",
    "eval_interpolation": "bicubic",
}


def test_imagenet_paper_recipe_is_timms_and_follows_the_seed_alone(tmp_path: Path) -> None:
    """RandAugment and random erasing draw from Python's and numpy's RNGs: the batches must be the
    same however those were left, and a loader resumed mid-epoch must give the remaining ones."""
    root = str(write_fake_imagenet(tmp_path, num_classes=3, per_class_train=6, per_class_val=1))
    kwargs = dict(root=root, num_classes=3, image_size=32, val_size=3, batch_size=3)
    data = ImageNetDataModule(**kwargs, augmentation=PAPER_RECIPE)
    names = [type(t).__name__ for t in data.augment_transform().transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert "RandAugment" in names and names[-1] == "RandomErasing"
    assert "ColorJitter" not in names  # timm drops it under RandAugment, as the paper's code
    eval_names = [type(t).__name__ for t in data.eval_transform().transform.transforms]
    assert eval_names[:2] == ["Resize", "CenterCrop"]
    assert data.eval_transform().transform.transforms[0].size == 36  # 32 / 0.875, floored

    data.setup()
    loader = data.train_dataloader()
    expected = [x for x, _ in loader]
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    again = ImageNetDataModule(**kwargs, augmentation=PAPER_RECIPE)
    again.setup()
    resumed = again.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "consumed": 1})
    assert all(
        torch.equal(a, b) for a, b in zip(expected[1:], (x for x, _ in resumed), strict=True)
    )
    standard = ImageNetDataModule(**kwargs)
    standard.setup()
    assert not torch.equal(first_batch(standard.train_dataloader())[0], expected[0])


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"auto_augment": "rand-x9"}, "auto_augment='rand-x9' is not a policy timm can build"),
        ({"auto_augment": "magic"}, "auto_augment=magic: a timm policy string"),
        ({"re_prob": 1.5}, "re_prob=1.5: a probability"),
        ({"interpolation": "nearest"}, "interpolation=nearest: one of bilinear, bicubic, random"),
    ],
)
def test_imagenet_recipe_refuses_bad_settings(tmp_path: Path, recipe: dict, message: str) -> None:
    root = str(write_fake_imagenet(tmp_path, num_classes=2, per_class_train=2, per_class_val=1))
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageNetDataModule(root=root, num_classes=2, val_size=1, augmentation=recipe)


def test_imagenet_class_count_must_match_the_tree(tmp_path: Path) -> None:
    root = str(write_fake_imagenet(tmp_path, num_classes=3, per_class_train=2, per_class_val=1))
    with pytest.raises(ValueError, match="3 class folders but num_classes=1000"):
        ImageNetDataModule(root=root, val_size=1).setup()


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda root: CIFAR10DataModule(root=root), "cifar-10-batches-py/data_batch_1"),
        (lambda root: CIFAR100DataModule(root=root), "cifar-100-python/train"),
        (lambda root: ImageNetDataModule(root=root), "/train"),
    ],
)
def test_missing_data_says_what_and_where(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(DataRootError) as missing:
        make(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(missing.value) and expected in str(missing.value)
    assert "dataset.root=" in str(missing.value) and "never downloads" in str(missing.value)
    with pytest.raises(DataRootError, match="dataset.root is not set"):
        make(None)


def test_a_missing_cifar_batch_is_named(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path, num_classes=10, num_train=20, num_test=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataRootError, match="missing .*data_batch_3\\. Expected"):
        CIFAR10DataModule(root=str(tmp_path))


def test_imagenet_without_val_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataRootError, match=str(tmp_path / "val")):
        ImageNetDataModule(root=str(tmp_path))


def test_bad_arguments_fail_early() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        small_synthetic(batch_size=0)
    with pytest.raises(ValueError, match="val_size"):
        small_synthetic(val_size=-1)
    with pytest.raises(ValueError, match="channels"):
        DigitsDataModule(channels=2)
    with pytest.raises(ValueError, match="val_size=300 must be smaller than the 300"):
        small_synthetic(val_size=300).setup()
