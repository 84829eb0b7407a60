"""Image data for vitcrs: CIFAR-10/100 (fine or coarse labels), image folders and a synthetic task.

``VisionDataModule`` is what the app instantiates from the ``data:`` config node; see its docstring.
"""

from vitcrs.data.datamodule import LABEL_TYPES, SOURCES, VisionDataModule
from vitcrs.data.transforms import BatchCollate, ImageTensorDataset, random_crop_flip, to_model_input

__all__ = [
    "LABEL_TYPES",
    "SOURCES",
    "BatchCollate",
    "ImageTensorDataset",
    "VisionDataModule",
    "random_crop_flip",
    "to_model_input",
]
