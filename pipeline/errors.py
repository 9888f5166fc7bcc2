"""The errors a user can meet and act on: the scripts print their message, not a traceback.

Each carries a message that names the file, row, cache or key concerned and says what to do.
"""

from pipeline.backbone import CheckpointMismatchError, MissingWeightsError
from pipeline.cache import CacheError
from pipeline.checks import ManifestCheckError
from pipeline.extraction import NonFiniteFeaturesError, WorkerError
from pipeline.images import ImageError
from pipeline.manifest import ManifestError
from pipeline.run_dir import RunDirError
from pipeline.training import MissingFeaturesError

USER_ERRORS = (
    CacheError, CheckpointMismatchError, ImageError, ManifestCheckError, ManifestError,
    MissingFeaturesError, MissingWeightsError, NonFiniteFeaturesError, RunDirError, WorkerError,
    FileNotFoundError, OSError,
)
