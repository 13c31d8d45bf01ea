"""Moved to :mod:`duplex.sources` (model files are resolved outside the server); re-exported here."""

from duplex.sources import (  # noqa: F401
    FILE_SCHEME,
    HF_SCHEME,
    HubFileMissing,
    ModelSourceError,
    hub_download,
    is_hub_source,
    local_path_of,
    resolve_source,
    split_hub_source,
)
