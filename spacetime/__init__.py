"""spacetime: composable space-time layers for video diffusion (image/video agnostic)."""

from spacetime.attend import attend
from spacetime.params import mark_temporal, spatial_parameters, temporal_parameters

__all__ = ["attend", "mark_temporal", "spatial_parameters", "temporal_parameters"]
