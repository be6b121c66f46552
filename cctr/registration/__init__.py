"""Registration stage (DESIGN §4): VoxelMorph-style net, its training, label transfer + coordinates cache.

Python API for the segmentation trainer:
    ensure_registration(dataset, cfg, split)  -> checkpoint path (trains if missing)
    registration_maps(dataset, cfg, split)    -> RegMaps: per case y_reg, c_reg, coords (cached)
    confidence_calibration(maps, ds, ids, t)  -> y_reg Dice where c_reg >= t vs below (validation cases)
"""

from cctr.registration.apply import (
           CaseMaps,
           RegMaps,
           confidence_calibration,
           registration_maps,
)
from cctr.registration.train import (
           ensure_registration,
           find_checkpoint,
           train_registration,
)

__all__ = ["CaseMaps", "RegMaps", "confidence_calibration", "ensure_registration", "find_checkpoint",
           "registration_maps", "train_registration"]
