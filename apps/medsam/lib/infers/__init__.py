from .medsam import MedSAMInfer

__all__ = ["MedSAMInfer"]
