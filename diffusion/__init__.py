"""diffusion: the pluggable diffusion process, trainer, video data, text encoders and CLI."""
