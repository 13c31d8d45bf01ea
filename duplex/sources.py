"""Where model files come from: local paths, ``file://`` URLs and the Hugging Face Hub.

A *source* is a string given by the user or named in a repository's ``config.json``:

- ``/path/to/file`` or ``relative/path`` — a local file;
- ``file:///abs/path`` (or ``file://relative/path``) — the same, as a URL;
- ``hf://owner/repo/path/in/repo`` — a file of any Hub model repository;
- a bare file name *inside the default repository* (only for names read from ``config.json``).

Hub files are fetched with ``huggingface_hub.hf_hub_download``: its progress bars, its cache
(``HF_HOME`` / ``HF_HUB_CACHE``) and its offline mode (``HF_HUB_OFFLINE=1``) all apply.
Every failure becomes one :class:`ModelSourceError` whose message says what to do.
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

logger = logging.getLogger(__name__)

HF_SCHEME = "hf://"
FILE_SCHEME = "file://"


class ModelSourceError(Exception):
    """A model file could not be found, fetched or loaded; the message is meant for the user."""


class HubFileMissing(ModelSourceError):
    """The repository exists (or the hub is reachable) but does not hold the requested file."""


def is_hub_source(spec: str) -> bool:
    """True when ``spec`` names a file on the Hugging Face Hub (``hf://owner/repo/file``)."""
    return spec.startswith(HF_SCHEME)


def split_hub_source(spec: str) -> tuple[str, str]:
    """``hf://owner/repo/dir/file`` -> (``owner/repo``, ``dir/file``)."""
    parts = spec[len(HF_SCHEME):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelSourceError(
            f"bad Hugging Face source {spec!r}: expected hf://OWNER/REPO/FILE "
            "(e.g. hf://kyutai/moshiko-pytorch-bf16/model.safetensors)"
        )
    return "/".join(parts[:2]), "/".join(parts[2:])


def local_path_of(spec: str) -> Path:
    """The local path named by a plain path or a ``file://`` URL (not checked for existence)."""
    if spec.startswith(FILE_SCHEME):
        rest = urllib.parse.unquote(spec[len(FILE_SCHEME):])
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return Path(rest).expanduser()
    return Path(spec).expanduser()


def resolve_source(spec: str, what: str, default_repo: str | None = None) -> Path:
    """Turn a source string into a local file path, downloading from the Hub when needed.

    ``what`` names the file for error messages (e.g. "Moshi LM weights"). A bare name that does
    not exist locally is looked up in ``default_repo`` when one is given (names from ``config.json``).
    """
    if is_hub_source(spec):
        repo, filename = split_hub_source(spec)
        return hub_download(repo, filename, what)
    path = local_path_of(spec)
    if path.is_file():
        return path
    if default_repo is not None and not spec.startswith(FILE_SCHEME) and not path.is_absolute():
        return hub_download(default_repo, spec, what)
    if path.exists():
        raise ModelSourceError(f"{what}: {path} is not a file")
    raise ModelSourceError(f"{what}: file not found: {path}")


def hub_download(repo: str, filename: str, what: str) -> Path:
    """Fetch ``filename`` from model repository ``repo`` (cached; progress shown by huggingface_hub)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    where = f"{filename} from the Hugging Face repository {repo}"
    logger.info("fetching %s: %s", what, where)
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename))
    except hf_errors.GatedRepoError as exc:
        raise ModelSourceError(
            f"{what}: access to {repo} is gated; accept its terms on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN) ({_first_line(exc)})"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"{what}: repository {repo} not found on the Hugging Face Hub (or it is private)"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ModelSourceError(f"{what}: revision not found in {repo}") from exc
    except hf_errors.RemoteEntryNotFoundError as exc:
        raise HubFileMissing(f"{what}: {repo} has no file {filename}") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        if huggingface_hub.constants.is_offline_mode():
            raise HubFileMissing(
                f"{what}: {where} is not in the local cache and offline mode is on (HF_HUB_OFFLINE); "
                "download it once online, or pass local files (--moshi-weight, --mimi-weight, --tokenizer, --config)"
            ) from exc
        raise ModelSourceError(
            f"{what}: cannot fetch {where}: the Hugging Face Hub is unreachable and the file is not in the "
            "local cache. Check the network, set HF_HUB_OFFLINE=1 to use cached files only, or pass local "
            "files (--moshi-weight, --mimi-weight, --tokenizer, --config)."
        ) from exc
    except hf_errors.HFValidationError as exc:
        raise ModelSourceError(f"{what}: bad repository name {repo!r}: {_first_line(exc)}") from exc
    except (OSError, ConnectionError) as exc:  # HTTP errors, offline mode, network failures
        raise ModelSourceError(
            f"{what}: cannot fetch {where}: {_first_line(exc)}. Check the network, set "
            "HF_HUB_OFFLINE=1 to use the local cache only, or pass local files."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
