"""Where a conversion writes: the --mlx-path folder, checked before anything is written, and the
hidden folders beside it that make the finished model appear all at once.

--force replaces only a folder that an earlier conversion wrote, recognised by its files; never the
filesystem's root, a home folder, the current folder, the checkpoint, or a folder holding anything
else. Hidden folders are named after the host and the process that made them, so a later run can
remove what a run killed outright left behind, and never what a live run is still writing. A
filesystem that refuses to be written is one error naming the path and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mimo_mlx.errors import MimoError, file_in_the_way

from .hub import SIDE_FILES
from .report import format_size
from .writer import INDEX_FILE

# Every file a conversion writes: a folder holding anything else is not only ours to replace.
OUTPUT_FILES = frozenset({"config.json", "README.md", INDEX_FILE, *SIDE_FILES})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_FINDER_FILE = ".DS_Store"  # macOS Finder leaves one in any folder it shows; it holds no data
# A pid means nothing on another machine sharing the filesystem, so hidden folders name the host too.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_KINDS = ("partial", "old")  # a conversion being written; a replaced one being removed

_ADVICE = {
    errno.ENOSPC: "{need}free space there, or choose another --mlx-path",
    errno.EDQUOT: "{need}free some of your quota there, or choose another --mlx-path",
    errno.EACCES: "choose an --mlx-path in a folder you may write to",
    errno.EPERM: "choose an --mlx-path in a folder you may write to",
    errno.EROFS: "that filesystem is read-only: choose another --mlx-path",
    errno.ENAMETOOLONG: "choose a shorter --mlx-path",
}


def target_path(mlx_path: str | os.PathLike) -> Path:
    """--mlx-path made absolute, its parent's links resolved; the last part is kept as given, so a
    link there is seen as a link. "." and ".." stand for the folders they name."""
    text = os.fspath(mlx_path)
    if not text.strip():
        raise MimoError(
            f"--mlx-path {text!r} is empty; give the folder to create (an unset shell variable "
            "expands to nothing)"
        )
    path = Path(text).expanduser().absolute()
    if path.name in ("", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def refuse_protected(target: Path) -> None:
    """Refuse, with or without --force, a target whose replacement would take what is not ours."""
    real = target.resolve()
    if real.parent == real or os.path.ismount(real):
        reason = "is the root of a filesystem"
    else:
        reason = _holds_a_working_folder(real)
    if reason:
        raise MimoError(
            f"--mlx-path {target} {reason}; choose a new folder for the converted model"
        )


def _holds_a_working_folder(real: Path) -> str | None:
    places = [(home, "your home folder") for home in _homes()]
    try:
        places.append((Path.cwd(), "the current folder"))
    except FileNotFoundError:  # the current folder was deleted: nothing there to protect
        pass
    for place, what in places:
        if real == place:
            return f"is {what}"
        if real in place.parents:
            return f"holds {what} ({place})"
    return None


def _homes() -> list[Path]:
    """$HOME and the password database's home, which differ under sudo."""
    homes = [os.path.expanduser("~")]
    try:
        import pwd  # noqa: PLC0415  (POSIX only)

        homes.append(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    return [Path(home).resolve() for home in dict.fromkeys(homes) if os.path.isabs(home)]


def refuse_source(target: Path, source: Path) -> None:
    """Refuse a target that is or holds the checkpoint, or that lies in it and would be replaced."""
    real = target.resolve()
    if real == source or real in source.parents:
        raise MimoError(
            f"--mlx-path {target} would replace the checkpoint being converted ({source}); "
            "choose another folder"
        )
    if exists(target) and source in real.parents:
        raise MimoError(
            f"--mlx-path {target} lies inside the checkpoint being converted ({source}); --force "
            "replaces nothing there: choose a folder outside it"
        )


def check_existing(target: Path, force: bool) -> None:
    """Refuse an existing target unless --force is given and an earlier conversion wrote it."""
    if not exists(target):
        return
    with filesystem_errors(target):
        foreign = _not_a_conversion(target)
    if foreign:
        raise MimoError(
            f"{target} already exists and {foreign}; --force replaces only a folder that "
            "mimo-mlx convert wrote: choose another --mlx-path, or empty it yourself"
        )
    if not force:
        raise MimoError(f"{target} already exists; pass --force to replace it")


def _not_a_conversion(folder: Path) -> str | None:
    """Why `folder` is not an earlier conversion's output, or None when it is one (or empty)."""
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.is_dir():
        return "is a file"
    entries = sorted(folder.iterdir())
    strays = [e.name + ("/" if e.is_dir() else "") for e in entries if not _is_output_file(e)]
    if strays:
        listed = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        return f"holds files that mimo-mlx convert does not write ({listed})"
    if not entries:
        return None  # nothing to lose
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return "has no config.json"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "has a config.json that is not valid JSON"
    if not isinstance(config, dict) or not isinstance(config.get("mimo_mlx"), dict):
        return "has a config.json without the mimo_mlx section that a conversion writes"
    return None


def _is_output_file(entry: Path) -> bool:
    if entry.is_symlink() or not entry.is_file():
        return False
    name = entry.name
    return name in OUTPUT_FILES or name == _FINDER_FILE or _SHARD.fullmatch(name) is not None


def new_hidden_folder(target: Path, kind: str) -> Path:
    """A fresh `.name.<host>-<pid>-<random>.<kind>` folder beside `target` (mkdir honours the
    umask; mkdtemp would leave the finished model readable by its owner only)."""
    while True:
        token = secrets.token_hex(4)
        folder = target.parent / f".{target.name}.{HOST_TAG}-{os.getpid()}-{token}.{kind}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def remove_debris(target: Path) -> None:
    """Remove the hidden folders that conversions to `target` killed outright (SIGKILL, power loss)
    left behind. One of a live process, of another host, or holding anything not ours stays."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.([0-9a-f]{{8}})-(\d{{1,10}})-[0-9a-f]{{8}}\.({'|'.join(_KINDS)})"
    )
    with filesystem_errors(target):
        try:
            entries = sorted(target.parent.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return  # no parent folder yet: no debris either
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is None or entry.is_symlink() or not entry.is_dir():
                continue
            if match[1] != HOST_TAG or not _dead(int(match[2])):
                continue
            if match[3] == "partial":
                _remove_partial(entry)
            else:
                _settle_old(entry, target)


def _dead(pid: int) -> bool:
    """Whether no process has this pid now (a reused pid only keeps debris a little longer)."""
    if pid == os.getpid():
        return False  # ours: another conversion in this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # someone else's live process, or no pid at all
    return False


def _remove_partial(folder: Path) -> None:
    if all(_is_output_file(entry) for entry in folder.iterdir()):
        shutil.rmtree(folder)


def _settle_old(folder: Path, target: Path) -> None:
    """A replaced output the killed run had moved aside: back into place if the new one never got
    there, else removed."""
    inside = list(folder.iterdir())
    previous = folder / target.name
    if inside and (inside != [previous] or previous.is_symlink() or not previous.is_dir()):
        return  # not what a conversion leaves
    if inside and not exists(target):
        os.rename(previous, target)
    elif inside:
        shutil.rmtree(previous)
    folder.rmdir()


def make_parents(target: Path) -> list[Path]:
    """Create the missing folders above `target`, outermost first, and return them so that a
    failed run can remove them again."""
    missing = []
    for parent in target.parents:
        if exists(parent):
            break
        missing.append(parent)
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except BaseException:
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders`, innermost first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # something else is in it now; it and the folders above it stay


def move_into_place(work: Path, target: Path, force: bool) -> None:
    """Rename the finished `work` folder to `target`. An earlier output (with --force) is checked
    again, moved aside, and removed only once the new one is in place."""
    if not exists(target):
        os.rename(work, target)
        return
    check_existing(target, force)  # it appeared or changed while converting
    old = new_hidden_folder(target, "old")
    os.rename(target, old / target.name)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old / target.name, target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def filesystem_errors(target: Path, need: int | None = None) -> Iterator[None]:
    """An OSError while checking or writing the output becomes one MimoError that names the path
    and says what to do; `need` is the size of the output, for a full disk."""
    try:
        yield
    except OSError as err:
        raise MimoError(_describe(err, target, need)) from None


def _describe(err: OSError, target: Path, need: int | None) -> str:
    if err.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        blocker = file_in_the_way(target.parent)
        if blocker is not None:
            return (
                f"cannot create {target}: {blocker} is a file, not a folder; choose another "
                "--mlx-path"
            )
    place = Path(err.filename) if err.filename else target.parent
    if str(place).startswith(str(target.parent / f".{target.name}.")):
        place = target.parent  # our hidden folder's name would only puzzle
    needed = f"the converted model needs {format_size(need)}: " if need else ""
    advice = _ADVICE.get(err.errno, "choose another --mlx-path").format(need=needed)
    return f"cannot write {target}: {err.strerror or err} ({place}); {advice}"
