"""The model bundle: everything a server, ``duplex infer`` or a benchmark needs, loaded once.

A bundle is built from local files (:class:`BundleFiles`) by the builder of its model family,
picked from ``config.json``'s ``model_type`` through one table, :data:`MODEL_BUILDERS`. Only
``moshi`` (Moshi / Moshika: Mimi + the Moshi LM + a sentencepiece tokenizer) is built today;
other Kyutai families are refused by name until they are supported.

Audio constants (frame size, sample rate, frame rate, codebook counts) are read from the loaded
models through the bundle's properties, never repeated as numbers. Resolving *where* the files
come from (local paths, ``hf://``, the default repository) is :mod:`duplex.bundle_args`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from duplex.sources import ModelSourceError

if TYPE_CHECKING:
    from duplex.codec import Mimi
    from duplex.model.config import LMConfig
    from duplex.model.lm import LMModel
    from duplex.model.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# config.json keys that pick files and defaults rather than describe the LM.
SOURCE_KEYS = frozenset({"moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lm_gen_config", "model_type"})
# LMGen's keyword arguments and their defaults (Moshi's published sampling settings).
DEFAULT_LM_GEN = {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
DEFAULT_MODEL_TYPE = "moshi"
# Kyutai model families that duplex recognises but does not run yet: model_type -> what it is.
NOT_YET_SUPPORTED = {
    "hibiki": "Kyutai's Hibiki, streaming speech translation",
    "hibiki_zero": "Kyutai's Hibiki, streaming speech translation",
    "stt": "Kyutai's streaming speech-to-text",
    "tts": "Kyutai's streaming text-to-speech",
    "personaplex": "PersonaPlex, a persona-conditioned Moshi",
    "helium": "Kyutai's Helium, a text-only LM",
}


@dataclass(frozen=True)
class BundleFiles:
    """The local files of one model, resolved; ``config`` is the raw config.json ({} = the 7B preset)."""

    lm_weights: Path
    mimi_weights: Path
    tokenizer: Path
    config: dict[str, Any] = field(default_factory=dict)
    mimi_config: Path | dict[str, Any] | None = None
    model_name: str = ""

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", DEFAULT_MODEL_TYPE))


@dataclass
class ModelBundle:
    """A loaded model family: codec, LM, tokenizer and sampling defaults, on one device."""

    mimi: Mimi  # float32, num_codebooks set for the LM
    lm: LMModel
    lm_gen_defaults: dict[str, Any]  # LMGen keyword arguments (use_sampling, temp, temp_text, top_k, top_k_text)
    tokenizer: TextTokenizer
    model_name: str
    device: torch.device
    dtype: torch.dtype  # the LM's dtype (Mimi always runs in float32)
    config: dict[str, Any] = field(default_factory=dict)  # the raw config.json ({} = 7B preset)
    model_type: str = DEFAULT_MODEL_TYPE

    # Audio constants, from the loaded models.
    @property
    def sample_rate(self) -> int:
        return self.mimi.sample_rate

    @property
    def frame_size(self) -> int:
        """Audio samples per model step (1920 for Mimi at 24 kHz)."""
        return self.mimi.frame_size

    @property
    def frame_rate(self) -> float:
        return self.mimi.frame_rate

    @property
    def num_codebooks(self) -> int:
        """Mimi codebooks encoded / decoded per frame."""
        return self.mimi.num_codebooks

    @property
    def model_codebooks(self) -> int:
        """Audio streams the LM produces (dep_q)."""
        return self.lm.config.dep_q

    @property
    def user_codebooks(self) -> int:
        """Audio streams of the user the LM reads."""
        return self.lm.config.num_user_codebooks


LoadedModels = ModelBundle  # the earlier name
Builder = Callable[[BundleFiles, torch.device, torch.dtype], ModelBundle]


def build_moshi(files: BundleFiles, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """Moshi: the text tokenizer, Mimi (float32) and the LM; cheap checks first, then the weights."""
    from duplex.codec import Mimi, MimiConfig
    from duplex.model import LMModel, TextTokenizer

    text_tokenizer = _build(lambda: TextTokenizer(str(files.tokenizer)), "text tokenizer", files.tokenizer)
    lm_config = _build(lambda: lm_config_of(files.config), "LM config", files.model_name or "config.json")
    check_tokenizer_fits(text_tokenizer, lm_config)
    codec_config = None
    if files.mimi_config is not None:
        raw = files.mimi_config if isinstance(files.mimi_config, dict) else read_json(files.mimi_config, "Mimi config")
        codec_config = _build(lambda: MimiConfig.from_kyutai(raw), "Mimi config", files.mimi_config)
    mimi = _build(lambda: Mimi.from_pretrained(files.mimi_weights, config=codec_config,
                                               num_codebooks=codebooks_needed(lm_config),
                                               device=device, dtype=torch.float32),
                  "Mimi codec weights", files.mimi_weights)
    lm = _build(lambda: LMModel.from_pretrained(files.lm_weights, config=lm_config, device=device, dtype=dtype),
                "Moshi LM weights", files.lm_weights)
    name = files.model_name or Path(files.lm_weights).parent.name or Path(files.lm_weights).stem
    return ModelBundle(mimi=mimi.eval(), lm=lm.eval(), lm_gen_defaults=lm_gen_defaults(files.config),
                       tokenizer=text_tokenizer, model_name=name, device=device, dtype=dtype,
                       config=dict(files.config), model_type=files.model_type)


# The one table of model families: config.json's model_type -> builder.
MODEL_BUILDERS: dict[str, Builder] = {"moshi": build_moshi}


def builder_for(config: dict[str, Any]) -> Builder:
    """The builder of a config's ``model_type`` (default moshi); ModelSourceError for other families."""
    model_type = config.get("model_type", DEFAULT_MODEL_TYPE)
    if model_type in MODEL_BUILDERS:
        return MODEL_BUILDERS[model_type]
    supported = ", ".join(sorted(MODEL_BUILDERS))
    if model_type in NOT_YET_SUPPORTED:
        raise ModelSourceError(f"model_type {model_type!r} is not supported yet ({NOT_YET_SUPPORTED[model_type]}): "
                               f"duplex runs model_type {supported} only")
    raise ModelSourceError(f"unknown model_type {model_type!r} (supported: {supported})")


def load_bundle(files: BundleFiles, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a bundle from resolved local files with the builder of their model_type."""
    return builder_for(files.config)(files, torch.device(device), dtype)


def load_models_from_paths(
    moshi_weight: str | Path,
    mimi_weight: str | Path,
    tokenizer: str | Path,
    config: dict | str | Path | None = None,
    mimi_config: dict | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str | None = None,
) -> ModelBundle:
    """Load from local files. ``config`` is a Kyutai LM config (dict or path; None = 7B preset)."""
    config_dict = read_json(config, "LM config") if isinstance(config, (str, Path)) else dict(config or {})
    codec = Path(mimi_config) if isinstance(mimi_config, str) else mimi_config
    files = BundleFiles(Path(moshi_weight), Path(mimi_weight), Path(tokenizer), config_dict, codec, model_name or "")
    return load_bundle(files, device, dtype)


def lm_config_of(config: dict[str, Any]) -> LMConfig:
    """The LMConfig a raw config.json describes ({} = the Moshi 7B preset)."""
    from duplex.model import LMConfig

    lm_keys = {k: v for k, v in config.items() if k not in SOURCE_KEYS}
    return LMConfig.from_kyutai(lm_keys) if config else LMConfig.moshi_7b()


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


def lm_gen_defaults(config: dict) -> dict:
    """Default sampling settings: Moshi's published ones, updated by the config's ``lm_gen_config``."""
    overrides = config.get("lm_gen_config") or {}
    if not isinstance(overrides, dict):
        raise ModelSourceError(f"lm_gen_config must be a JSON object, got {overrides!r}")
    unknown = sorted(set(overrides) - set(DEFAULT_LM_GEN))
    if unknown:
        logger.warning("lm_gen_config keys not used: %s", ", ".join(unknown))
    return {**DEFAULT_LM_GEN, **{k: v for k, v in overrides.items() if k in DEFAULT_LM_GEN}}


def codebooks_needed(lm_config: LMConfig) -> int:
    """How many Mimi codebooks the LM reads and writes: max(model streams, user streams)."""
    return max(lm_config.dep_q, lm_config.n_q - lm_config.dep_q)


def check_tokenizer_fits(tokenizer: TextTokenizer, lm_config: LMConfig) -> None:
    """Warn when the text tokenizer cannot name every text token the LM may produce."""
    if tokenizer.vocab_size < lm_config.text_card:
        logger.warning("the text tokenizer has %d pieces but the LM produces %d text tokens: "
                       "is it the model's tokenizer?", tokenizer.vocab_size, lm_config.text_card)


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
