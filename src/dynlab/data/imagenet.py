"""ImageNet (ILSVRC-2012) from an ImageFolder tree: `<root>/train/<class>/*` and `<root>/val/<class>/*`.

The standard pipeline: RandomResizedCrop + flip for training, Resize(256) + CenterCrop(224) for
evaluation (sizes scaled with `image_size`); as MSDNet, 50000 training images are held out for
validation and the official val set is the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchvision import transforms
from torchvision.datasets import ImageFolder

from dynlab.config import ImageNetConfig
from dynlab.data.base import DataInfo, DynlabDataModule, require_paths
from dynlab.data.transforms import Deterministic, TorchSeeded

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # eval resizes the short side to image_size * 256/224, then center-crops
LAYOUT = ImageNetConfig.LAYOUT  # the schema's, which validation checks before torch loads


class ImageNetDataModule(DynlabDataModule):
    """ImageNet classification with the standard 224 pipeline (`image_size` configurable)."""

    def __init__(
        self,
        *,
        root: str | None,
        num_classes: int = 1000,
        image_size: int = 224,
        val_size: int = 50000,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        if num_classes < 2:
            raise ValueError(f"imagenet: num_classes must be >= 2, got {num_classes}")
        if image_size < 8:
            raise ValueError(f"imagenet: image_size must be >= 8, got {image_size}")
        self.data_dir: Path = require_paths("imagenet", self.root, LAYOUT, ["train", "val"])
        self.num_classes, self.image_size = num_classes, image_size
        self._to_tensor = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )

    @property
    def info(self) -> DataInfo:
        return DataInfo("imagenet", self.num_classes, (3, self.image_size, self.image_size))

    def load_train_test(self) -> tuple[ImageFolder, ImageFolder]:
        train, test = (
            ImageFolder(str(self.data_dir / "train")),
            ImageFolder(str(self.data_dir / "val")),
        )
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"imagenet: {self.data_dir / 'train'} has {len(train.classes)} class folders but "
                f"num_classes={self.num_classes}"
            )
        if test.classes != train.classes:
            raise ValueError(
                f"imagenet: the class folders of {self.data_dir / 'val'} differ from those of "
                f"{self.data_dir / 'train'}"
            )
        return train, test

    def eval_transform(self) -> Deterministic:
        resize = round(self.image_size * RESIZE_RATIO)
        return Deterministic(
            transforms.Compose(
                [transforms.Resize(resize), transforms.CenterCrop(self.image_size), self._to_tensor]
            )
        )

    def augment_transform(self) -> TorchSeeded:
        return TorchSeeded(
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(self.image_size),
                    transforms.RandomHorizontalFlip(),
                    self._to_tensor,
                ]
            )
        )
