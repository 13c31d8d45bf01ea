"""Moved: the model bundle lives in :mod:`duplex.bundle` and its flags in :mod:`duplex.bundle_args`,
so that serve, ``duplex infer`` and the benchmarks load models without reaching into the server.
Re-exported here for existing imports."""

from duplex.bundle import (  # noqa: F401
    DEFAULT_LM_GEN,
    MODEL_BUILDERS,
    SOURCE_KEYS,
    BundleFiles,
    LoadedModels,
    ModelBundle,
    builder_for,
    codebooks_needed,
    lm_gen_defaults,
    load_bundle,
    load_models_from_paths,
    read_json,
)
from duplex.bundle_args import (  # noqa: F401
    DEFAULT_HF_REPO,
    DEFAULT_MIMI_NAME,
    DEFAULT_MOSHI_NAME,
    DEFAULT_TOKENIZER_NAME,
    DTYPES,
    add_model_arguments,
    load_models,
    pick_device,
    pick_dtype,
    resolve_files,
)
from duplex.sources import ModelSourceError  # noqa: F401
