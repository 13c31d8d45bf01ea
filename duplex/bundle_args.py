"""Command-line model flags, and resolving them into the local files of a :class:`~duplex.bundle.ModelBundle`.

Defaults fetch ``kyutai/moshiko-pytorch-bf16`` from the Hugging Face Hub. Each file can be replaced
by a local path, a ``file://`` URL or an ``hf://owner/repo/file`` source (see :mod:`duplex.sources`).
A repository's ``config.json`` is honoured when present: its LM keys build the model, and
``moshi_name``, ``mimi_name``, ``tokenizer_name``, ``mimi_config_name``, ``lm_gen_config`` and
``model_type`` pick files, defaults and the model family. Without a config the Moshi 7B preset
and the default file names apply. ``duplex serve``, ``duplex infer`` and the benchmarks all load
through :func:`load_models`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from duplex.bundle import BundleFiles, ModelBundle, builder_for, load_bundle, read_json
from duplex.sources import HubFileMissing, ModelSourceError, local_path_of, resolve_source

logger = logging.getLogger(__name__)

DEFAULT_HF_REPO = "kyutai/moshiko-pytorch-bf16"
DEFAULT_MOSHI_NAME = "model.safetensors"
DEFAULT_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model source, device and dtype flags to ``parser``."""
    group = parser.add_argument_group("model sources (local path, file:// URL or hf://owner/repo/file)")
    group.add_argument(
        "--hf-repo", default=DEFAULT_HF_REPO,
        help="Hugging Face model repository that provides config.json and every file not given "
        f"explicitly (default: {DEFAULT_HF_REPO}); cached under HF_HOME, HF_HUB_OFFLINE=1 uses the cache only",
    )
    group.add_argument("--moshi-weight", help="Moshi LM weights (safetensors, published fused or per-step layout)")
    group.add_argument("--mimi-weight", help="Mimi codec weights (safetensors, published fused or per-step layout)")
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
    from duplex.model.quant_cli import add_quantize_argument

    add_quantize_argument(group)
    from duplex.model.lora_cli import add_lora_arguments

    add_lora_arguments(parser.add_argument_group("LoRA adapters"))


def load_models(args: argparse.Namespace) -> ModelBundle:
    """Resolve every source named by ``args`` (see :func:`add_model_arguments`) and load the bundle.

    Raises :class:`ModelSourceError` with a user-facing message on any missing or bad file.
    """
    device = pick_device(getattr(args, "device", None))
    dtype = pick_dtype(getattr(args, "dtype", None), device)
    bundle = load_bundle(resolve_files(args), device, dtype)
    from duplex.model.lora_cli import apply_lora_arguments

    try:
        apply_lora_arguments(bundle, args)  # --lora-weight (merged), --adapter NAME=PATH (per conversation)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from exc
    return bundle


def resolve_files(args: argparse.Namespace) -> BundleFiles:
    """The local files the flags name: explicit ones, else the repo's config.json names, else the defaults.

    The model family is checked (``builder_for``) before any weights are fetched.
    """
    repo = getattr(args, "hf_repo", None) or DEFAULT_HF_REPO
    explicit = {name: getattr(args, name, None) for name in ("moshi_weight", "mimi_weight", "tokenizer")}
    config_spec = getattr(args, "config", None) or sibling_config(explicit["moshi_weight"])
    weights_repo = hub_repo_of(explicit["moshi_weight"])  # hf://owner/repo/file: that repo's config.json
    config = read_repo_config(config_spec, weights_repo or repo,
                              need_hub=bool(weights_repo) or not all(explicit.values()))
    builder_for(config)
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
    return BundleFiles(lm_path, mimi_path, tokenizer_path, config, mimi_config_path, name,
                       quantize=getattr(args, "quantize", None))


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


def pick_device(name: str | None) -> torch.device:
    """The requested device, or cuda when available else cpu; a clear error for unusable ones."""
    from duplex.model.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from exc


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
