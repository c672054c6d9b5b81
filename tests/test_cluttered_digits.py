"""dataset=cluttered_digits: digits' split, fixed canvases, the digit where recorded, clutter from
other digits of the same split only, range checks, and a tiny training run."""

from __future__ import annotations

import pytest
import torch

from dynlab.config import ClutteredDigitsConfig
from dynlab.data import cluttered_digits
from dynlab.data.base import DataInfo, TensorImages
from dynlab.data.cluttered_digits import ClutteredDigitsDataModule, clutter_canvases
from dynlab.data.digits import DigitsDataModule, digits_images, split_train_test
from dynlab.validation import ConfigError, check_schema_rules

SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def default() -> tuple[ClutteredDigitsDataModule, dict[str, TensorImages]]:
    """The default datamodule (64x64, 24x24 digits, 4 fragments) and its (train, test) sets."""
    data = ClutteredDigitsDataModule(batch_size=16)
    return data, dict(zip(SPLITS, data.load_train_test(), strict=True))


def upsampled_digits(size: int) -> dict[str, torch.Tensor]:
    """Digits' train/test digits as grey [N,size,size], the way the canvases hold them."""
    train, test = split_train_test(digits_images(1, size))
    return {"train": train.images[:, 0], "test": test.images[:, 0]}


def crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The grey boxes (top, left, bottom, right) of images [N,C,H,W] as [N,h,w]."""
    return torch.stack(
        [im[0, t:b, lf:r] for im, (t, lf, b, r) in zip(images, boxes.tolist(), strict=True)]
    )


def outside_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Grey images [N,H,W] with each box zeroed: what lies outside the digit."""
    out = images[:, 0].clone()
    for image, (t, lf, b, r) in zip(out, boxes.tolist(), strict=True):
        image[t:b, lf:r] = 0
    return out


def test_shapes_info_and_batches(default) -> None:
    data, sets = default
    assert data.info == DataInfo("cluttered_digits", 10, (3, 64, 64))
    assert {k: tuple(s.images.shape) for k, s in sets.items()} == {
        "train": (1438, 3, 64, 64),
        "test": (359, 3, 64, 64),
    }
    assert all(s.images.dtype == torch.uint8 for s in sets.values())
    # The grey value is replicated over the channels.
    assert torch.equal(sets["test"].images[:, 0], sets["test"].images[:, 2])
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32 and y.shape == (16,)
    one = ClutteredDigitsDataModule(channels=1, canvas_size=40, digit_size=16)
    assert one.info.input_size == (1, 40, 40)
    assert one.load_train_test()[1].images.shape == (359, 1, 40, 40)


def test_split_is_digits_split(default) -> None:
    data, sets = default
    train, test = DigitsDataModule(channels=1).load_train_test()
    assert torch.equal(sets["train"].labels, train.labels)
    assert torch.equal(sets["test"].labels, test.labels)
    data.setup()
    assert (len(data.splits.train), len(data.splits.val)) == (1238, 200)


def test_canvases_are_fixed_whatever_the_run_seed(default) -> None:
    data, sets = default
    again = ClutteredDigitsDataModule(seed=7)
    for split, images in zip(SPLITS, again.load_train_test(), strict=True):
        assert torch.equal(images.images, sets[split].images)
        assert torch.equal(again.positions[split], data.positions[split])


def test_digit_is_at_its_recorded_position_anywhere_on_the_canvas(default) -> None:
    data, sets = default
    digits = upsampled_digits(24)
    for split in SPLITS:
        positions = data.positions[split]
        assert positions.shape == (len(sets[split]), 2)
        # Uniform over 0..40 for rows and columns: both ends of the range are used.
        assert positions.min() >= 0 and positions.max() <= 64 - 24
        for axis in (0, 1):
            assert (positions[:, axis] < 10).any() and (positions[:, axis] > 30).any()
        boxes = data.digit_boxes(split)
        assert torch.equal(boxes[:, 2:] - boxes[:, :2], torch.full_like(positions, 24))
        # Clutter composes by max, so the box holds at least the digit, and mostly exactly it.
        crop = crops(sets[split].images, boxes)
        assert (crop >= digits[split]).all()
        assert (crop == digits[split]).float().mean() > 0.9
    # A box 3 rows off would not hold the digit: the check above can fail.
    rows = data.positions["test"][:, 0]
    step = torch.where(rows <= 64 - 24 - 3, 3, -3)
    shifted = data.digit_boxes("test") + step[:, None] * torch.tensor([1, 0, 1, 0])
    holds = (crops(sets["test"].images, shifted) >= digits["test"]).flatten(1).all(1)
    assert holds.float().mean() < 0.1


def test_clutter_lies_outside_the_digit_and_none_without_it(default) -> None:
    data, sets = default
    lit = outside_boxes(sets["train"].images, data.digit_boxes("train")).flatten(1).amax(1) > 0
    assert lit.float().mean() > 0.9
    clean = ClutteredDigitsDataModule(clutter=0, channels=1)
    _, test = clean.load_train_test()
    assert not outside_boxes(test.images, clean.digit_boxes("test")).any()
    assert torch.equal(crops(test.images, clean.digit_boxes("test")), upsampled_digits(24)["test"])


def test_fragments_come_from_other_digits() -> None:
    """Digit k is a flat square of value k+1: every fragment pixel names its source digit."""
    num, size, fragment = 50, 12, 12
    flat = (torch.arange(num, dtype=torch.uint8) + 1).view(-1, 1, 1, 1).expand(-1, 1, size, size)
    generator = torch.Generator().manual_seed(0)
    canvases, positions = clutter_canvases(flat, 48, 6, fragment, generator)
    outside = outside_boxes(canvases, torch.cat([positions, positions + size], 1))
    own = (torch.arange(num) + 1).view(-1, 1, 1)
    assert outside.any(2).any(1).all()  # every canvas has clutter outside its digit
    assert not (outside == own).any()  # ... never a piece of its own digit


def test_clutter_of_a_split_comes_from_that_split_only(monkeypatch) -> None:
    """Train digits are flat 2s and test digits flat 1s: no canvas holds the other split's value."""
    ids = TensorImages(torch.zeros(1797, 1, 1, 1, dtype=torch.uint8), torch.arange(1797))
    train_ids, test_ids = (part.labels for part in split_train_test(ids))
    values = torch.zeros(1797, dtype=torch.uint8)
    values[train_ids], values[test_ids] = 2, 1

    def flat_digits(channels: int, size: int) -> TensorImages:
        images = values.view(-1, 1, 1, 1).expand(-1, channels, size, size).contiguous()
        return TensorImages(images, torch.arange(1797) % 10)

    monkeypatch.setattr(cluttered_digits, "digits_images", flat_digits)
    train, test = ClutteredDigitsDataModule(clutter=8).load_train_test()
    assert set(train.images.unique().tolist()) == {0, 2}
    assert set(test.images.unique().tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
        ({"digit_size": 7}, r"digit_size must be in \[8, canvas_size=64\], got digit_size=7"),
        ({"digit_size": 65}, "got digit_size=65"),
        ({"canvas_size": 20}, r"\[8, canvas_size=20\], got digit_size=24"),
        (
            {"fragment_size": 0},
            r"fragment_size must be in \[1, digit_size=24\], got fragment_size=0",
        ),
        ({"fragment_size": 25}, "got fragment_size=25"),
        ({"clutter": -1}, "clutter must be >= 0 fragments, got clutter=-1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ClutteredDigitsDataModule(**kwargs)
    with pytest.raises(ValueError, match=message):
        ClutteredDigitsConfig(**kwargs)


def test_composed_config_checks_ranges_before_building(compose_cfg) -> None:
    cfg = compose_cfg(["dataset=cluttered_digits", "dataset.digit_size=80"])
    with pytest.raises(ConfigError, match="dataset: cluttered_digits: .*got digit_size=80"):
        check_schema_rules(cfg)
