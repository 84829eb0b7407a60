"""Image data for vitcrs: one source class per dataset, composed by the data module the app instantiates.

``VisionDataModule`` is built from the ``data:`` config node (``build_datamodule``, for a model's
``ModelInputs``), its ``source`` from ``data.source`` (the ``dataset`` config group): :class:`CifarSource`
(CIFAR-10/100, fine or coarse labels),
:class:`ImageFolderSource` (class folders) or :class:`SyntheticSource` (a generated task).
"""

from vitcrs.data.cifar import CifarSource
from vitcrs.data.datamodule import VisionDataModule, build_datamodule
from vitcrs.data.imagefolder import ImageFolderSource
from vitcrs.data.inputs import ModelInputs
from vitcrs.data.source import DataSource
from vitcrs.data.synthetic import SyntheticSource
from vitcrs.data.train_loader import EpochSampler, TrainLoader
from vitcrs.data.transforms import BatchCollate, ImageTensorDataset, random_crop_flip, to_model_input

__all__ = [
    "BatchCollate",
    "CifarSource",
    "DataSource",
    "EpochSampler",
    "ImageFolderSource",
    "ImageTensorDataset",
    "ModelInputs",
    "SyntheticSource",
    "TrainLoader",
    "VisionDataModule",
    "build_datamodule",
    "random_crop_flip",
    "to_model_input",
]
