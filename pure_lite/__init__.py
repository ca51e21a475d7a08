"""pure-lite: PURE real-world super-resolution, small and fast.

Importing this package does not import torch; the torch backend loads it on first use.

    import pure_lite
    restorer = pure_lite.Restorer.from_pretrained("nonwhy/PURE")  # a Hub id or a local folder
    result = restorer.restore("photo.png", seed=0)
    result.image.save("restored.png"); print(result.degradation, result.description)
"""

from .errors import (
    CheckpointError, GenerationCancelled, GenerationError, HubError, InvalidImageError, ManifestError, MissingDependencyError, OutputError,
    PureLiteError, TokenFormatError,
)
from .restorer import Restoration, Restorer
from .sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "Restorer", "Restoration", "SamplingConfig", "PureLiteError", "InvalidImageError", "TokenFormatError",
    "CheckpointError", "HubError", "ManifestError", "GenerationError", "GenerationCancelled", "MissingDependencyError", "OutputError",
    "__version__",
]
