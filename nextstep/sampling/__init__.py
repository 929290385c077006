"""Model-free flow samplers and classifier-free guidance."""

from .flow import SAMPLERS, integrate, time_grid
from .guidance import Guidance

__all__ = ["SAMPLERS", "Guidance", "integrate", "time_grid"]
