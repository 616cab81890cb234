from .auto import AutoTrain
from .medsam import MedSAMTrain

__all__ = ["AutoTrain", "MedSAMTrain"]
