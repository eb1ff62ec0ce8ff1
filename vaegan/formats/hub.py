"""VAEs named by Hugging Face hub name (`owner/name`): read from the local cache, downloaded when online.

Only the VAE's own files are fetched: its config.json and one weights file (a sharded one: the index and its
shards), at the repository root or in `vae/`, never the tens of gigabytes of the pipeline around it. They
land in huggingface_hub's cache (`models--owner--name/snapshots/<commit>/`), where the next call finds them,
online or not.

huggingface_hub reads HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE once, when it is imported; this module reads
them again on every call, so that setting them later in a process (as a test does) is obeyed, never
silently overruled by a download.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Where a pipeline repository keeps its VAE; tried after the repository root unless a subfolder is named.
PIPELINE_SUBFOLDER = "vae"
# `owner/name` as the hub spells repository ids. A path object, `./x`, `/x`, `~/x`, `a/b/c` or a file name
# (`a/vae.safetensors`) is never sent to the hub, even when no such local path exists.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")


class HubError(Exception):
    """A hub name that does not lead to a VAE; the message names the repository, what was tried, and what
    to do about it."""


def is_repo_id(name: object) -> bool:
    """Whether `name` is a string that reads as `owner/name`, not as a path."""
    return (
        isinstance(name, str)
        and _REPO_ID.fullmatch(name) is not None
        and ".." not in name
        and not name.lower().endswith(_FILE_SUFFIXES)
    )


def download_folder(
    repo_id: str,
    *,
    subfolder: str | None,
    revision: str | None,
    config_name: str,
    weights_names: Sequence[str],
) -> Path:
    """The local folder (in the hub cache) holding `config_name` and the first of `weights_names` that the
    repository has, in `subfolder`, or when that is None at the repository root, else in `vae/`."""
    offline, cache = _offline(), _cache_dir()
    folders = [subfolder.strip("/")] if subfolder is not None else ["", PIPELINE_SUBFOLDER]
    tried = []  # what each folder lacked, for the error
    for folder in folders:
        config = _fetch(repo_id, _join(folder, config_name), revision, cache, offline)
        if config is None:
            tried.append(_join(folder, config_name))
            continue
        # Every file from the snapshot the config came from, even if the branch moves meanwhile.
        commit = config.parents[len(Path(_join(folder, config_name)).parts) - 1].name
        for name in weights_names:
            weights = _fetch(repo_id, _join(folder, name), commit, cache, offline)
            if weights is not None:
                if name.endswith(".index.json"):
                    _fetch_shards(repo_id, folder, weights, commit, cache, offline)
                return config.parent
        tried.append(f"{_join(folder, config_name)} (there, but no weights file beside it)")
    at_revision, tried = f"at revision {revision or 'main'}", " and ".join(tried)
    if offline:
        raise HubError(
            f"{repo_id} is not a local path, and the Hugging Face cache at {cache} holds no VAE of it {at_revision} "
            f"(tried {tried}; HF_HUB_OFFLINE is set, so nothing was downloaded). "
            + _download_advice(repo_id, folders, config_name, weights_names[0], revision)
        )
    raise HubError(
        f"{repo_id} is not a local path, and its repository on the Hugging Face hub has no VAE {at_revision} "
        f"(tried {tried}); name the folder that holds it with subfolder="
    )


def _download_advice(repo_id: str, folders: list[str], config_name: str, weights_name: str, revision: str | None):
    """The `hf download` command that puts the files tried into the cache, full-precision weights first."""
    files = " ".join(_join(folder, name) for folder in folders for name in (config_name, weights_name))
    pinned = f" --revision {revision}" if revision else ""
    return f"Download it with `hf download {repo_id} {files}{pinned}`, or unset HF_HUB_OFFLINE."


def _fetch(repo_id: str, filename: str, revision: str | None, cache: Path, offline: bool) -> Path | None:
    """The cached file, downloaded first when online; None when the repository (offline: the cache) lacks it."""
    try:
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline)
        )
    except LocalEntryNotFoundError as error:  # offline: not cached; online: the hub was not reachable
        if offline:
            return None
        raise HubError(
            f"{repo_id}: could not reach the Hugging Face hub for {filename}, and the cache at {cache} does not "
            f"hold it ({error})"
        ) from error
    except EntryNotFoundError:
        return None
    except GatedRepoError as error:
        raise HubError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in with "
            "`hf auth login`"
        ) from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"{repo_id} is neither a local path nor a repository on the Hugging Face hub (if it is private, "
            "log in with `hf auth login`)"
        ) from error
    except RevisionNotFoundError as error:
        raise HubError(f"{repo_id} has no revision {revision!r}") from error


def _fetch_shards(repo_id: str, folder: str, index: Path, commit: str, cache: Path, offline: bool) -> None:
    """Every shard a sharded checkpoint's index names, from the same snapshot."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise HubError(f"{index} is not a readable shard index with a weight_map ({error})") from error
    for shard in shards:
        if _fetch(repo_id, _join(folder, shard), commit, cache, offline) is None:
            where = f"the cache at {cache} lacks (HF_HUB_OFFLINE is set)" if offline else "its repository lacks"
            raise HubError(f"{repo_id}: {index.name} names the shard {_join(folder, shard)}, which {where}")


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return constants.HF_HUB_OFFLINE
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> Path:
    """huggingface_hub's cache, as the environment says now: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)
