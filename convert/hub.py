"""Find the checkpoint to convert: a local folder, or a Hugging Face repo fetched with huggingface_hub.

Downloads go through huggingface_hub, so its cache, HF_HUB_OFFLINE and token apply as everywhere
else. Only what a conversion needs is fetched, in two steps: the small files first (config, tokenizer,
templates, the shard index), so a repo that is not a Qwen2.5-VL model is refused before gigabytes of
weights are downloaded; then exactly the shards the index lists. Pickled weights are never fetched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mimo_mlx.errors import MimoError

INDEX_FILE = "model.safetensors.index.json"
# Everything besides the weights that a converted folder carries over.
SIDE_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
SMALL_FILES = ("config.json", INDEX_FILE, *SIDE_FILES)


@dataclass(frozen=True)
class Source:
    """A local folder holding the checkpoint, and where it came from."""

    folder: Path
    name: str  # the repo id, or the folder's absolute path
    revision: str | None  # the resolved commit for a hub repo; None for a local folder


def resolve(hf_path: str, revision: str | None, check_config: Callable[[Path], object]) -> Source:
    """The checkpoint for `hf_path` (a folder, or a repo id to fetch at `revision`).

    `check_config(folder)` runs once config.json is there and before any weights are fetched.
    """
    path = Path(hf_path).expanduser()
    if path.exists():
        if revision is not None:
            raise MimoError(
                "--revision pins a Hugging Face repo; it does not apply to a local folder"
            )
        if not path.is_dir():
            raise MimoError(f"{hf_path} is a file; give a model folder or a Hugging Face repo id")
        check_config(path)
        return Source(path.resolve(), str(path.resolve()), None)
    if not _looks_like_repo_id(hf_path):
        raise MimoError(
            f"{hf_path} is neither an existing folder nor a Hugging Face repo id (org/name)"
        )
    return _fetch(hf_path, revision, check_config)


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError  # noqa: PLC0415  (slow import)
    from huggingface_hub.utils import validate_repo_id  # noqa: PLC0415

    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _fetch(repo_id: str, revision: str | None, check_config: Callable[[Path], object]) -> Source:
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    with _hub_errors(repo_id, revision):
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(SMALL_FILES))
        )
    if not (folder / "config.json").is_file():
        raise MimoError(f"{repo_id} has no config.json, so it is not a transformers model repo")
    check_config(folder)
    commit = folder.name  # snapshots/<commit>: pin it so both steps see the same revision
    with _hub_errors(repo_id, revision):
        snapshot_download(repo_id, revision=commit, allow_patterns=_shard_patterns(folder))
    if not any(folder.glob("*.safetensors")):
        raise MimoError(
            f"{repo_id} has no .safetensors weights; mimo-mlx never downloads or loads pickled "
            "PyTorch checkpoints (*.bin, *.pt) because they can run code"
        )
    return Source(folder, repo_id, commit)


def _shard_patterns(folder: Path) -> list[str]:
    """The shards the index lists, or every top-level *.safetensors file when there is none."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return ["*.safetensors"]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise MimoError(
            f"{INDEX_FILE} of the repo is not a valid safetensors index ({err})"
        ) from None


@contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line MimoErrors that say what to do."""
    from huggingface_hub import errors  # noqa: PLC0415

    at = f" at revision {revision}" if revision else ""
    try:
        yield
    except errors.GatedRepoError:
        raise MimoError(
            f"{repo} is gated: accept its terms on https://huggingface.co/{repo}, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise MimoError(
            f"{repo} was not found on the Hugging Face hub (if it is private, log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise MimoError(f"{repo} has no revision {revision!r}") from None
    except errors.IncompleteSnapshotError:
        raise MimoError(
            f"the cached copy of {repo}{at} is incomplete and the hub cannot be reached; "
            "connect to the network (HF_HUB_OFFLINE unset) to finish the download"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise MimoError(
            f"{repo}{at} is not in the Hugging Face cache, or only partly, and the hub cannot be "
            "reached (HF_HUB_OFFLINE is set, or there is no network)"
        ) from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise MimoError(f"downloading {repo}{at} failed: {_first_line(err)}") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
