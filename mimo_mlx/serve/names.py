"""The names a served model answers to in a request's `model` field.

A client with a fixed model name (an editor plugin that sends "gpt-4o", a script written for the
hub id) should not have to be reconfigured for a one-model server, so by default any name is
answered, as llama.cpp does. `--model-name NAME` makes the check strict: then NAME, the --model
value, the model folder's name and the hub id it was converted from (or was given as) are
accepted, and any other name is a 404 `model_not_found`. `/v1/models` lists the served id:
NAME, else the --model value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..model.checkpoint import read_config

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ModelNames:
    """`id` first in `names`; `strict`: only `names` are accepted."""

    names: tuple[str, ...]
    strict: bool

    @property
    def id(self) -> str:
        return self.names[0]


def model_names(model: str, folder: Path, model_name: str | None = None) -> ModelNames:
    """The names for a model given as `model` (a folder or a hub id) and loaded from `folder`;
    strict when the user chose a `model_name`."""
    names = [model_name or model, model, folder.name, folder.resolve().name]
    source = read_config(folder).get("mimo_mlx", {}).get("source")
    if isinstance(source, str) and _REPO_ID.match(source):
        names.append(source)  # converted from this hub id
    unique = tuple(dict.fromkeys(name for name in names if name))
    return ModelNames(unique, strict=model_name is not None)
