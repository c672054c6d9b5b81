"""ImageNet (ILSVRC-2012) from an ImageFolder tree: `<root>/train/<class>/*` and `<root>/val/<class>/*`.

Training and evaluation transforms come from timm's transform factory with the preset's recipe
(`dataset.augmentation`): by default RandomResizedCrop + flip, and Resize(256) + CenterCrop(224)
for evaluation (sizes follow `image_size`); a preset adds its paper's RandAugment, random erasing,
colour jitter or interpolation. As MSDNet, 50000 training images are held out for validation and
the official val set is the test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from timm.data import create_transform
from torchvision.datasets import ImageFolder

from dynlab.data.base import DataInfo, DynlabDataModule, require_paths
from dynlab.data.transforms import Deterministic, Seeded
from dynlab.dataset_config import ImageAugmentConfig, ImageNetConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = ImageNetConfig.LAYOUT  # the schema's, which validation checks before torch loads
STANDARD = ImageAugmentConfig()  # crop + flip; the schema's default


class ImageNetDataModule(DynlabDataModule):
    """ImageNet classification at `image_size` with a paper's augmentation recipe."""

    def __init__(
        self,
        *,
        root: str | None,
        num_classes: int = 1000,
        image_size: int = 224,
        val_size: int = 50000,
        augmentation: ImageAugmentConfig | Mapping[str, Any] = STANDARD,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        if num_classes < 2:
            raise ValueError(f"imagenet: num_classes must be >= 2, got {num_classes}")
        if image_size < 8:
            raise ValueError(f"imagenet: image_size must be >= 8, got {image_size}")
        self.data_dir: Path = require_paths("imagenet", self.root, LAYOUT, ["train", "val"])
        self.num_classes, self.image_size = num_classes, image_size
        self.recipe = (
            augmentation
            if isinstance(augmentation, ImageAugmentConfig)
            else ImageAugmentConfig(**augmentation)
        )
        self._train_pipeline = self._timm_pipeline(training=True)  # a bad policy fails here
        self._eval_pipeline = self._timm_pipeline(training=False)

    def _timm_pipeline(self, training: bool) -> Any:
        """timm's pipeline for this recipe (PIL image in, normalised tensor out)."""
        recipe = self.recipe
        if not training:
            return create_transform(
                self.image_size,
                is_training=False,
                interpolation=recipe.eval_interpolation,
                crop_pct=recipe.crop_pct,
                mean=MEAN,
                std=STD,
            )
        try:
            return create_transform(
                self.image_size,
                is_training=True,
                scale=tuple(recipe.scale),
                hflip=recipe.hflip,
                color_jitter=recipe.color_jitter or None,  # 0: no ColorJitter (it draws anyway)
                auto_augment=recipe.auto_augment,
                interpolation=recipe.interpolation,
                mean=MEAN,
                std=STD,
                re_prob=recipe.re_prob,
                re_mode=recipe.re_mode,
                re_count=recipe.re_count,
            )
        except (AssertionError, KeyError, ValueError) as err:
            raise ValueError(
                f"imagenet: dataset.augmentation.auto_augment={recipe.auto_augment!r} is not a "
                f"policy timm can build ({type(err).__name__}: {err}); e.g. rand-m9-mstd0.5"
            ) from None

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
        return Deterministic(self._eval_pipeline)

    def augment_transform(self) -> Seeded:
        return Seeded(self._train_pipeline)
