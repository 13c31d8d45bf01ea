"""Loading the three model files (Moshi LM, Mimi codec, text tokenizer) the way users of the
published Kyutai models expect.

Defaults fetch ``kyutai/moshiko-pytorch-bf16`` from the Hugging Face Hub. Each file can be replaced
by a local path, a ``file://`` URL or an ``hf://owner/repo/file`` source (see
:mod:`duplex.server.model_sources`). A repository's ``config.json`` is honoured when present:
its LM keys build the model, and ``moshi_name``, ``mimi_name``, ``tokenizer_name``,
``mimi_config_name``, ``lm_gen_config`` and ``model_type`` pick files and defaults.
Without a config the Moshi 7B preset and the default file names apply.

The tiny test fixtures load through exactly this code (``load_models_from_paths``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from duplex.server.model_sources import (
    HubFileMissing,
    ModelSourceError,
    local_path_of,
    resolve_source,
)

__all__ = [
    "DEFAULT_HF_REPO",
    "LoadedModels",
    "ModelSourceError",
    "add_model_arguments",
    "load_models",
    "load_models_from_paths",
]

logger = logging.getLogger(__name__)

DEFAULT_HF_REPO = "kyutai/moshiko-pytorch-bf16"
DEFAULT_MOSHI_NAME = "model.safetensors"
DEFAULT_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
SUPPORTED_MODEL_TYPES = ("moshi",)
# config.json keys that pick files and defaults rather than describe the LM.
SOURCE_KEYS = frozenset({"moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lm_gen_config", "model_type"})
# LMGen's keyword arguments and their defaults (Moshi's published sampling settings).
DEFAULT_LM_GEN = {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModels:
    """Everything a server or offline run needs, loaded once."""

    mimi: Any  # duplex.codec.mimi.Mimi, float32, num_codebooks set for the LM
    lm: Any  # duplex.model.lm.LMModel
    lm_gen_defaults: dict  # LMGen keyword arguments (use_sampling, temp, temp_text, top_k, top_k_text)
    tokenizer: Any  # duplex.model.tokenizer.TextTokenizer
    model_name: str
    device: torch.device
    dtype: torch.dtype  # the LM's dtype (Mimi always runs in float32)
    config: dict = field(default_factory=dict)  # the raw config.json ({} = 7B preset)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model source, device and dtype flags to ``parser``."""
    group = parser.add_argument_group("model sources (local path, file:// URL or hf://owner/repo/file)")
    group.add_argument(
        "--hf-repo", default=DEFAULT_HF_REPO,
        help="Hugging Face model repository that provides config.json and every file not given "
        f"explicitly (default: {DEFAULT_HF_REPO}); cached under HF_HOME, HF_HUB_OFFLINE=1 uses the cache only",
    )
    group.add_argument("--moshi-weight", help="Moshi LM weights (safetensors, Kyutai key names)")
    group.add_argument("--mimi-weight", help="Mimi codec weights (safetensors, Kyutai key names)")
    group.add_argument(
        "--mimi-config", help="Mimi config.json (Kyutai's codec config format) for a non-default codec; "
        "default: the repo's mimi_config_name, else the published Mimi",
    )
    group.add_argument("--tokenizer", help="sentencepiece text tokenizer (.model)")
    group.add_argument(
        "--config", help="Kyutai LM config.json; default: config.json next to a local --moshi-weight, else the "
        "repo's config.json, else the Moshi 7B preset (the hub is not contacted when --moshi-weight, "
        "--mimi-weight and --tokenizer are all given)",
    )
    group.add_argument(
        "--device", default=None,
        help="torch device to run on, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)",
    )
    group.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="LM weight dtype (default: bfloat16 on cuda, float32 on cpu); Mimi always runs in float32",
    )
    from duplex.model.lora_cli import add_lora_arguments

    add_lora_arguments(parser.add_argument_group("LoRA adapters"))


def load_models(args: argparse.Namespace) -> LoadedModels:
    """Resolve every source named by ``args`` (see :func:`add_model_arguments`) and load the models.

    Raises :class:`ModelSourceError` with a user-facing message on any missing or bad file.
    """
    device = pick_device(getattr(args, "device", None))
    dtype = pick_dtype(getattr(args, "dtype", None), device)
    repo = getattr(args, "hf_repo", None) or DEFAULT_HF_REPO
    explicit = {name: getattr(args, name, None) for name in ("moshi_weight", "mimi_weight", "tokenizer")}
    config_spec = getattr(args, "config", None) or sibling_config(explicit["moshi_weight"])
    weights_repo = hub_repo_of(explicit["moshi_weight"])  # hf://owner/repo/file: that repo's config.json
    config = read_repo_config(config_spec, weights_repo or repo,
                              need_hub=bool(weights_repo) or not all(explicit.values()))
    check_model_type(config)
    lm_path = resolve_source(explicit["moshi_weight"] or config.get("moshi_name", DEFAULT_MOSHI_NAME),
                             "Moshi LM weights", repo)
    mimi_path = resolve_source(explicit["mimi_weight"] or config.get("mimi_name", DEFAULT_MIMI_NAME),
                               "Mimi codec weights", repo)
    tokenizer_path = resolve_source(
        explicit["tokenizer"] or config.get("tokenizer_name", DEFAULT_TOKENIZER_NAME), "text tokenizer", repo
    )
    mimi_config_spec = getattr(args, "mimi_config", None) or config.get("mimi_config_name")
    mimi_config_path = resolve_source(mimi_config_spec, "Mimi config", repo) if mimi_config_spec else None
    name = describe_model(explicit["moshi_weight"], repo, lm_path)
    models = load_models_from_paths(
        lm_path, mimi_path, tokenizer_path, config=config, mimi_config=mimi_config_path,
        device=device, dtype=dtype, model_name=name,
    )
    from duplex.model.lora_cli import apply_lora_arguments

    try:
        apply_lora_arguments(models, args)  # --lora-weight (merged), --adapter NAME=PATH (per conversation)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from exc
    return models


def load_models_from_paths(
    moshi_weight: str | Path,
    mimi_weight: str | Path,
    tokenizer: str | Path,
    config: dict | str | Path | None = None,
    mimi_config: dict | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
) -> LoadedModels:
    """Load from local files. ``config`` is a Kyutai LM config (dict or path; None = 7B preset)."""
    from duplex.codec.config import MimiConfig
    from duplex.codec.mimi import Mimi
    from duplex.model.config import LMConfig
    from duplex.model.lm import LMModel
    from duplex.model.tokenizer import TextTokenizer

    device = torch.device(device)
    # Cheap checks first, so that a bad tokenizer or config fails before gigabytes are read.
    text_tokenizer = _build(lambda: TextTokenizer(str(tokenizer)), "text tokenizer", tokenizer)
    config_dict = read_json(config, "LM config") if isinstance(config, (str, Path)) else dict(config or {})
    lm_keys = {k: v for k, v in config_dict.items() if k not in SOURCE_KEYS}
    lm_config = _build(lambda: LMConfig.from_kyutai(lm_keys) if config_dict else LMConfig.moshi_7b(),
                       "LM config", config)
    check_tokenizer_fits(text_tokenizer, lm_config)
    codec_config = None
    if mimi_config is not None:
        codec_dict = read_json(mimi_config, "Mimi config") if isinstance(mimi_config, (str, Path)) else mimi_config
        codec_config = _build(lambda: MimiConfig.from_kyutai(codec_dict), "Mimi config", mimi_config)
    mimi = _build(lambda: Mimi.from_pretrained(mimi_weight, config=codec_config,
                                               num_codebooks=codebooks_needed(lm_config),
                                               device=device, dtype=torch.float32),
                  "Mimi codec weights", mimi_weight)
    lm = _build(lambda: LMModel.from_pretrained(moshi_weight, config=lm_config, device=device, dtype=dtype),
                "Moshi LM weights", moshi_weight)
    lm.eval()
    mimi.eval()
    return LoadedModels(
        mimi=mimi, lm=lm, lm_gen_defaults=lm_gen_defaults(config_dict), tokenizer=text_tokenizer,
        model_name=model_name or Path(moshi_weight).parent.name or Path(moshi_weight).stem,
        device=device, dtype=dtype, config=config_dict,
    )


def read_repo_config(spec: str | None, repo: str, need_hub: bool) -> dict:
    """The LM config dict: from ``spec``, else the repo's config.json when the hub is needed, else {}."""
    if spec:
        return read_json(resolve_source(spec, "LM config"), "LM config")
    if not need_hub:
        logger.info("no --config given: using the Moshi 7B preset")
        return {}
    try:
        path = resolve_source(f"hf://{repo}/config.json", "LM config")
    except HubFileMissing:
        logger.warning("%s has no config.json (or it is not cached): using the Moshi 7B preset and "
                       "default file names", repo)
        return {}
    return read_json(path, "LM config")


def hub_repo_of(spec: str | None) -> str | None:
    """``owner/repo`` of an ``hf://owner/repo/file`` source, else None."""
    if not spec or not spec.startswith("hf://"):
        return None
    parts = spec[len("hf://"):].split("/")
    return "/".join(parts[:2]) if len(parts) >= 3 else None


def sibling_config(moshi_spec: str | None) -> str | None:
    """``config.json`` next to local LM weights, used when --config is not given."""
    if not moshi_spec or moshi_spec.startswith("hf://"):
        return None
    candidate = local_path_of(moshi_spec).with_name("config.json")
    if candidate.is_file():
        logger.info("LM config: %s (next to the weights)", candidate)
        return str(candidate)
    return None


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object from a local path, with a clear error for bad content."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ModelSourceError(f"{what}: file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{what}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"{what}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def check_model_type(config: dict) -> None:
    """Reject repositories of model families this server does not run (e.g. Hibiki, STT)."""
    model_type = config.get("model_type", "moshi")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def lm_gen_defaults(config: dict) -> dict:
    """Default sampling settings: Moshi's published ones, updated by the config's ``lm_gen_config``."""
    overrides = config.get("lm_gen_config") or {}
    if not isinstance(overrides, dict):
        raise ModelSourceError(f"lm_gen_config must be a JSON object, got {overrides!r}")
    unknown = sorted(set(overrides) - set(DEFAULT_LM_GEN))
    if unknown:
        logger.warning("lm_gen_config keys not used: %s", ", ".join(unknown))
    return {**DEFAULT_LM_GEN, **{k: v for k, v in overrides.items() if k in DEFAULT_LM_GEN}}


def codebooks_needed(lm_config: Any) -> int:
    """How many Mimi codebooks the LM reads and writes: max(model streams, user streams)."""
    return max(lm_config.dep_q, lm_config.n_q - lm_config.dep_q)


def check_tokenizer_fits(tokenizer: Any, lm_config: Any) -> None:
    """Warn when the text tokenizer cannot name every text token the LM may produce."""
    if tokenizer.vocab_size < lm_config.text_card:
        logger.warning("the text tokenizer has %d pieces but the LM produces %d text tokens: "
                       "is it the model's tokenizer?", tokenizer.vocab_size, lm_config.text_card)


def pick_device(name: str | None) -> torch.device:
    """The requested device, or cuda when available else cpu; a clear error for unusable ones."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelSourceError(f"bad --device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The LM dtype: as requested, else bfloat16 on cuda and float32 elsewhere."""
    if name:
        if name not in DTYPES:
            raise ModelSourceError(f"bad --dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_model(moshi_spec: str | None, repo: str, lm_path: Path) -> str:
    """A short model name for logs and the info endpoint."""
    if moshi_spec is None:
        return repo
    if moshi_spec.startswith("hf://"):
        return moshi_spec[len("hf://"):]
    return f"{lm_path.parent.name}/{lm_path.name}" if lm_path.parent.name else lm_path.name


def _build(make, what: str, source: object):
    """Run a loader, turning any failure into a ModelSourceError naming the file."""
    try:
        return make()
    except ModelSourceError:
        raise
    except FileNotFoundError as exc:
        raise ModelSourceError(f"{what}: file not found: {source}") from exc
    except Exception as exc:  # noqa: BLE001 - any loader failure is reported as one clear message
        logger.debug("loading %s from %s failed", what, source, exc_info=True)
        raise ModelSourceError(f"{what}: cannot load {source}: {type(exc).__name__}: {exc}") from exc
