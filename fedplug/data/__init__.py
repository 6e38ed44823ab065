"""fedplug's data: the core's entry point into every dataset format.

Work in progress: see docs/data.md for the full interface.
"""

from __future__ import annotations

from fedplug.data.detection import DetectionDataset, DetectionSubset
from fedplug.data.errors import DatasetError
from fedplug.data.synthetic import CLASSES, generate_synthetic_federation
from fedplug.data.voc import VOCDetection


def detection_collate(batch):
    """Batch ``(image, target)`` pairs as torchvision detectors take them: (list of images, list of targets)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


__all__ = [
    "CLASSES",
    "DatasetError",
    "DetectionDataset",
    "DetectionSubset",
    "VOCDetection",
    "detection_collate",
    "generate_synthetic_federation",
]
