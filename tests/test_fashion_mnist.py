"""Fashion-MNIST from its IDX files, and the split options every dataset has (train_subset,
val_size=0, training on the whole split)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from dynlab.data.base import DataRootError
from dynlab.data.fake import write_fake_fashion_mnist, write_idx
from dynlab.data.fashion_mnist import FashionMNISTDataModule, read_idx
from dynlab.errors import ConfigError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")


def fashion(root: Path, **overrides: object) -> FashionMNISTDataModule:
    options: dict[str, object] = dict(channels=1, image_size=32, val_size=20, batch_size=16)
    return FashionMNISTDataModule(root=str(root), **{**options, **overrides})


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "images-idx3-ubyte", array, compress)
    assert path.suffix == (".gz" if compress else "")
    np.testing.assert_array_equal(read_idx(path), array)


def test_images_are_zero_padded_to_32_and_labels_kept(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=60, num_test=30)
    data = fashion(tmp_path)
    data.setup()
    assert data.info.input_size == (1, 32, 32) and data.info.num_classes == 10
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    image, label = data.splits.test[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 32, 32)
    assert torch.equal(image[0, 2:30, 2:30], torch.from_numpy(raw[3].copy()))
    assert image[0, :2].sum() == 0 and image[0, :, 30:].sum() == 0  # the padding is background
    assert label == int(labels[3])


def test_native_size_and_three_channels(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=60, num_test=30, compress=False)
    data = fashion(tmp_path, channels=3, image_size=28)
    data.setup()
    image, _ = data.splits.test[0]
    assert image.shape == (3, 28, 28) and torch.equal(image[0], image[2])
    x, _ = next(iter(data.test_dataloader()))
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32


def test_normalised_with_the_train_statistics_and_augmented_by_seed(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=200, num_test=30)
    data = fashion(tmp_path, batch_size=200, val_size=0)
    x, _ = next(iter(data.test_dataloader()))
    train = data.splits.whole.dataset.images.float() / 255  # type: ignore[union-attr]
    mean, std = train.mean().item(), train.std().item()
    expected = (data.splits.test[0][0].float() / 255 - mean) / std
    assert torch.allclose(x[0], expected, atol=1e-4)
    transform = data.augment_transform()
    image = data.splits.test[0][0]
    assert torch.equal(transform(image, 5), transform(image, 5))
    assert any(not torch.equal(transform(image, 5), transform(image, s)) for s in range(6, 12))


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataRootError, match="lacks t10k-labels-idx1-ubyte") as err:
        fashion(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(DataRootError, match="does not exist.*apt-get install"):
        fashion(tmp_path / "nowhere")


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=60, num_test=30)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataRootError, match="truncated"):
        fashion(tmp_path).setup()


def test_train_subset_is_a_seeded_part_of_the_train_split(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=100, num_test=10)
    full, small = fashion(tmp_path), fashion(tmp_path, train_subset=30)
    full.setup(), small.setup()
    assert len(small.splits.train) == 30 and len(small.splits.val) == 20
    assert small.splits.val.indices == full.splits.val.indices  # the held-out split is unchanged
    assert set(small.splits.train.indices) < set(full.splits.train.indices)
    again = fashion(tmp_path, train_subset=30)
    again.setup()
    assert again.splits.train.indices == small.splits.train.indices
    other = fashion(tmp_path, train_subset=30, seed=1)
    other.setup()
    assert other.splits.train.indices != small.splits.train.indices
    with pytest.raises(ConfigError, match="train_subset=90 must be at most the 80"):
        fashion(tmp_path, train_subset=90).setup()


def test_the_whole_split_adds_val_to_training(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=100, num_test=10)
    data = fashion(tmp_path, batch_size=10)
    held_out = len(data.train_dataloader().sampler)
    data.set_train_split(True)
    assert len(data.train_dataloader().sampler) == held_out + 20 == 100
    seen = sorted(data.splits.whole.indices)
    assert seen == list(range(100))
    data.set_train_split(False)
    assert len(data.train_dataloader().sampler) == held_out


def test_val_size_zero_holds_nothing_out(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, num_train=50, num_test=10)
    data = fashion(tmp_path, val_size=0)
    data.setup()
    assert len(data.splits.train) == 50 and len(data.splits.val) == 0
    assert list(data.val_dataloader()) == []


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_ROOT.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_real_files() -> None:
    data = FashionMNISTDataModule(
        root=str(DEBIAN_ROOT), channels=1, image_size=32, val_size=5000, batch_size=256
    )
    data.setup()
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (
        55000,
        5000,
        10000,
    )
    labels = data.splits.test.labels  # type: ignore[union-attr]
    assert torch.bincount(labels).tolist() == [1000] * 10  # the published test set: 1,000 a class
    mean = data.splits.whole.dataset.images.float().mean() / 255  # type: ignore[union-attr]
    assert 0.2 < mean.item() < 0.24  # 0.286 at 28x28, diluted by the padding (28/32)^2
