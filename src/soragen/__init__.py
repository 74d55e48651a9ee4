"""soragen: text-to-video from the command line.

A prompt goes through a T5 text encoder, a diffusion transformer denoises spacetime
latent patches under a diffusers scheduler, a causal video VAE decodes them, and
ffmpeg writes an MP4. Nothing heavy is imported here; see `soragen.pipeline`.
"""

__version__ = "0.1.0"

from soragen.config import Config, load_config  # noqa: E402  (light: pydantic + yaml)
from soragen.errors import UserError  # noqa: E402

__all__ = ["Config", "UserError", "__version__", "load_config"]
