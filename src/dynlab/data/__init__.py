"""LightningDataModules with deterministic, exactly resumable sampling (see sampling.py)."""

from dynlab.data.base import DataInfo, DataRootError, DynlabDataModule
from dynlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from dynlab.data.cluttered_digits import ClutteredDigitsDataModule
from dynlab.data.digits import DigitsDataModule
from dynlab.data.imagenet import ImageNetDataModule
from dynlab.data.sampling import ResumableLoaderCallback
from dynlab.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClutteredDigitsDataModule",
    "DataInfo",
    "DataRootError",
    "DigitsDataModule",
    "DynlabDataModule",
    "ImageNetDataModule",
    "ResumableLoaderCallback",
    "SyntheticDataModule",
]
