"""The errors a user can meet and act on: the scripts print their message, not a traceback.

Each carries a message that names the file, row, cache or key concerned and says what to do.
"""

from pipeline.cache.extraction import NonFiniteFeaturesError, WorkerError
from pipeline.cache.store import CacheError
from pipeline.data.checks import ManifestCheckError
from pipeline.data.images import ImageError
from pipeline.data.manifest import ManifestError
from pipeline.model.backbone import CheckpointMismatchError, MissingWeightsError
from pipeline.train.run_dir import RunDirError
from pipeline.train.setup import MissingFeaturesError

USER_ERRORS = (
    CacheError, CheckpointMismatchError, ImageError, ManifestCheckError, ManifestError,
    MissingFeaturesError, MissingWeightsError, NonFiniteFeaturesError, RunDirError, WorkerError,
    FileNotFoundError, OSError,
)
