from .diversity import Diversity
from .uncertainty import Uncertainty

__all__ = ["Diversity", "Uncertainty"]
