"""The datasets' structured-config schemas (`dataset=<name>`), with their range rules and the
image-augmentation recipe a dataset applies (`dataset.augmentation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import MISSING

from dynlab.schema_checks import SettingError
from dynlab.schema_checks import at_least as _at_least


@dataclass
class DatasetConfig:
    """Fields every dataset has; the datamodule's own schema adds the rest."""

    _target_: str = MISSING
    name: str = MISSING
    # The size of the train split the held-out val comes out of, where the dataset fixes it.
    TRAIN_SIZE: ClassVar[int | None] = None
    # Where the files lie under `root` (None: the dataset reads no files).
    LAYOUT: ClassVar[str | None] = None

    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 0
    # Held out of the train split for searches and threshold calibration; 0 holds nothing out
    # (then a phase that needs the held-out split refuses to start).
    val_size: int = 5000
    seed: int = "${seed}"  # type: ignore[assignment]
    augment: bool = True
    # Train on a seeded subset of this many images of the train split (a CPU budget); null: all.
    train_subset: int | None = None

    def __post_init__(self) -> None:
        _at_least({"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}, 1)
        _at_least({"train_subset": self.train_subset}, 1)
        _at_least({"num_workers": self.num_workers, "val_size": self.val_size}, 0)
        problem = split_problem(self.name, self.val_size, self.train_size(), self.train_subset)
        if problem:
            key, reason = problem
            raise SettingError(key, getattr(self, key), reason)

    def train_size(self) -> int | None:
        """Samples of the train split before val is held out of it (None: known once loaded)."""
        return self.TRAIN_SIZE


def split_problem(
    dataset: str, val_size: int, train_size: int | None, train_subset: int | None = None
) -> tuple[str, str] | None:
    """The key (`val_size` or `train_subset`) that cannot be taken out of `train_size` samples
    and why (the datamodule's `setup` asks again once the data is loaded), or None."""
    if val_size < 0:
        return "val_size", "the held-out split holds 0 samples or more"
    if train_size is not None and val_size >= train_size:
        return "val_size", (
            f"must be smaller than the {train_size} training samples of {dataset} it is held out "
            f"of, e.g. {max(1, train_size // 10)}"
        )
    if train_size is not None and train_subset is not None and train_subset > train_size - val_size:
        return "train_subset", (
            f"must be at most the {train_size - val_size} training samples of {dataset} left "
            f"after val_size={val_size}"
        )
    return None


@dataclass
class SyntheticConfig(DatasetConfig):
    _target_: str = "dynlab.data.synthetic.SyntheticDataModule"
    name: str = "synthetic"
    num_train: int = 2048
    num_test: int = 512
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    val_size: int = 256

    def train_size(self) -> int | None:
        return self.num_train


@dataclass
class DigitsConfig(DatasetConfig):
    # scikit-learn's 1797 digits less the fixed 20 % test split (dynlab.data.digits).
    TRAIN_SIZE: ClassVar[int | None] = 1438

    _target_: str = "dynlab.data.digits.DigitsDataModule"
    name: str = "digits"
    val_size: int = 200
    channels: int = 3


@dataclass
class ClutteredDigitsConfig(DatasetConfig):
    """Digits placed at random on a larger canvas among fragments of other digits (RAM-style)."""

    TRAIN_SIZE: ClassVar[int | None] = DigitsConfig.TRAIN_SIZE

    _target_: str = "dynlab.data.cluttered_digits.ClutteredDigitsDataModule"
    name: str = "cluttered_digits"
    canvas_size: int = 64
    digit_size: int = 24
    clutter: int = 4
    fragment_size: int = 8
    channels: int = 3
    val_size: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = self.range_problem(
            self.canvas_size, self.digit_size, self.fragment_size, self.clutter, self.channels
        )
        if problem:
            raise ValueError(problem)

    @staticmethod
    def range_problem(
        canvas_size: int, digit_size: int, fragment_size: int, clutter: int, channels: int
    ) -> str | None:
        """What is wrong with these sizes, or None (the datamodule runs the same check)."""
        if channels not in (1, 3):
            return f"cluttered_digits: channels must be 1 or 3, got {channels}"
        if not 8 <= digit_size <= canvas_size:
            return (
                f"cluttered_digits: digit_size must be in [8, canvas_size={canvas_size}], "
                f"got digit_size={digit_size}"
            )
        if not 1 <= fragment_size <= digit_size:
            return (
                f"cluttered_digits: fragment_size must be in [1, digit_size={digit_size}], "
                f"got fragment_size={fragment_size}"
            )
        if clutter < 0:
            return f"cluttered_digits: clutter must be >= 0 fragments, got clutter={clutter}"
        return None


@dataclass
class FashionMNISTConfig(DatasetConfig):
    """Fashion-MNIST's four IDX files (dynlab.data.fashion_mnist); 28x28 grey, zero-padded to 32."""

    TRAIN_SIZE: ClassVar[int | None] = 60000
    LAYOUT: ClassVar[str | None] = (
        "<root>/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each may be .gz; as root, apt-get install dataset-fashion-mnist "
        "puts them in /usr/share/datasets/fashion-mnist, the default root)"
    )

    _target_: str = "dynlab.data.fashion_mnist.FashionMNISTDataModule"
    name: str = "fashion_mnist"
    # Debian's folder, or $DYNLAB_DATA/fashion-mnist where DYNLAB_DATA is set.
    root: str | None = "${oc.env:DYNLAB_DATA,/usr/share/datasets}/fashion-mnist"
    channels: int = 1
    image_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = self.shape_problem(self.channels, self.image_size)
        if problem:
            raise ValueError(problem)

    @staticmethod
    def shape_problem(channels: int, image_size: int) -> str | None:
        """What is wrong with the image shape, or None (the datamodule asks the same)."""
        if channels not in (1, 3):
            return f"fashion_mnist: channels must be 1 or 3, got {channels}"
        if image_size not in (28, 32):
            return f"fashion_mnist: image_size must be 28 (native) or 32 (zero-padded), got {image_size}"
        return None


@dataclass
class CIFAR10Config(DatasetConfig):
    TRAIN_SIZE: ClassVar[int | None] = 50000
    LAYOUT: ClassVar[str | None] = (
        "<root>/cifar-10-batches-py/data_batch_1..5, test_batch (the python version of CIFAR-10)"
    )

    _target_: str = "dynlab.data.cifar.CIFAR10DataModule"
    name: str = "cifar10"
    root: str | None = "${oc.env:DYNLAB_DATA,data}"


@dataclass
class CIFAR100Config(CIFAR10Config):
    LAYOUT: ClassVar[str | None] = (
        "<root>/cifar-100-python/train, test (the python version of CIFAR-100)"
    )

    _target_: str = "dynlab.data.cifar.CIFAR100DataModule"
    name: str = "cifar100"


INTERPOLATIONS = ("bilinear", "bicubic", "random")  # timm's names; random: bilinear or bicubic
RE_MODES = ("const", "rand", "pixel")  # timm's RandomErasing fill modes
AUTO_AUGMENTS = ("rand", "augmix", "original", "v0", "3a")  # timm's policy families


@dataclass
class ImageAugmentConfig:
    """An ImageNet training/evaluation recipe, built by timm's transform factory
    (`timm.data.create_transform`) so each paper's augmentation is timm's tested code, not a
    re-implementation. The defaults are the standard recipe: RandomResizedCrop + flip, resize to
    size / crop_pct then centre crop for evaluation."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop's area
    hflip: float = 0.5
    # ColorJitter(b, b, b) for brightness, contrast and saturation; 0: none. timm drops it when
    # auto_augment is set (as the papers that use RandAugment do).
    color_jitter: float = 0.0
    # timm's policy string, e.g. "rand-m9-mstd0.5" (RandAugment, magnitude 9, std 0.5); null: none.
    auto_augment: str | None = None
    re_prob: float = 0.0  # random erasing: probability per image, fill mode, regions
    re_mode: str = "pixel"
    re_count: int = 1
    interpolation: str = "bilinear"  # the training crop's resize
    eval_interpolation: str = "bilinear"
    crop_pct: float = 0.875  # evaluation: resize the short side to size / crop_pct (224 -> 256)

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise SettingError("scale", list(self.scale), "two area fractions 0 < lo <= hi <= 1")
        for key in ("hflip", "re_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise SettingError(key, getattr(self, key), "a probability in [0, 1]")
        _at_least({"color_jitter": self.color_jitter}, 0)
        _at_least({"re_count": self.re_count}, 1)
        if self.re_mode not in RE_MODES:
            raise SettingError("re_mode", self.re_mode, f"one of {', '.join(RE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise SettingError(
                "interpolation", self.interpolation, f"one of {', '.join(INTERPOLATIONS)}"
            )
        if self.eval_interpolation not in INTERPOLATIONS[:2]:
            raise SettingError(
                "eval_interpolation", self.eval_interpolation, "one of bilinear, bicubic"
            )
        if not 0 < self.crop_pct <= 1:
            raise SettingError("crop_pct", self.crop_pct, "must be in (0, 1], e.g. 0.875")
        if self.auto_augment is not None and not self.auto_augment.startswith(AUTO_AUGMENTS):
            raise SettingError(
                "auto_augment",
                self.auto_augment,
                f"a timm policy string starting with {' or '.join(AUTO_AUGMENTS)}, "
                "e.g. rand-m9-mstd0.5 (or null)",
            )


@dataclass
class ImageNetConfig(DatasetConfig):
    LAYOUT: ClassVar[str | None] = (
        "<root>/train/<class>/<image> and <root>/val/<class>/<image> (ImageFolder layout; the "
        "official val images must be sorted into class folders)"
    )

    _target_: str = "dynlab.data.imagenet.ImageNetDataModule"
    name: str = "imagenet"
    root: str | None = "${oc.env:DYNLAB_DATA,data}/imagenet"
    val_size: int = 50000
    batch_size: int = 256
    num_workers: int = 8
    num_classes: int = 1000
    image_size: int = 224
    augmentation: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
