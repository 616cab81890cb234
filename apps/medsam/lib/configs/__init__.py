from .medsam import MedSAM

__all__ = ["MedSAM"]
