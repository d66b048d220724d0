"""The one pattern of the TFDS builders (UEA, PPG-DaLiA): raw files in, ``array_record`` out.

Each builder subclasses :class:`RawFilesBuilder` and fills in five hooks:

* ``_features()``: the ``DatasetInfo`` fields (features, description, ...);
* ``find_raw_files(folder)``: the raw files of this config under ``folder``, in a fixed
  order, or :class:`~flax_linoss.data.errors.DataNotFoundError`;
* ``_download_raw(dl_manager)``: fetch and extract the raw files with the real download
  code (``self._fetch(dl_manager, url)``), returning the folder they are in;
* ``_read_raw(files)``: parse and check every split, before anything is written (a dataset
  too large to hold, PPG-DaLiA, reads its files one by one while writing instead; a failure
  then still leaves nothing, as TFDS writes into an ``incomplete.*`` folder and renames it
  only when every split is complete);
* ``_generate_examples(data)``: the examples of one split.

The base class writes ``array_record`` (readable without TensorFlow), verifies every raw file
with :mod:`flax_linoss.data.checksums` before reading it, and records each raw file's SHA-256
in the prepared dataset's ``metadata.json`` (``raw_sha256``).

:func:`load` is how the package prepares and opens a dataset (``get_dataset`` and the
modules' command lines use it). With the data directory of :mod:`flax_linoss.data.paths`:

1. it holds a lock (``.prepare.lock`` in ``<data_dir>/<builder>/<config>/``) so that
   processes preparing the same dataset take turns;
2. it removes ``incomplete.*`` folders there, left by preparations that were killed;
3. it looks for the raw files in ``manual_dir`` if given (they must be there), else in
   ``<data_dir>/downloads/manual/``;
4. if the dataset is prepared: with no raw files found it is used as is; with raw files
   found, their digests must equal the recorded ones, else it is prepared again from them
   (the new copy is written beside the old one and swapped in only once complete; a raw
   file that no longer reads leaves the old copy in place and raises);
5. if it is not prepared, it prepares it, downloading the raw files if they were not found
   and ``download`` is on.

A data directory that cannot be written is fine for reading a prepared dataset; preparing
there raises a :class:`~flax_linoss.data.errors.DataError`. So does a data directory whose
dataset folder holds raw files (``<data_dir>/uea/<Name>/*.arff``, the layout earlier
versions read ``$FLAX_LINOSS_DATA_DIR`` as): nothing is written into a raw-data folder.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tensorflow_datasets as tfds
from etils import epath

from flax_linoss.data import checksums, paths
from flax_linoss.data.errors import DataError, DataNotFoundError, option

__all__ = [
    "LOCK_FILE",
    "RAW_SHA256",
    "RawFilesBuilder",
    "check_reachable",
    "load",
    "remove_incomplete",
]

log = logging.getLogger(__name__)

#: ``metadata.json`` key holding ``{raw file name: SHA-256}`` of a prepared dataset.
RAW_SHA256 = "raw_sha256"
#: Lock file in ``<data_dir>/<builder>/<config>/`` held while preparing.
LOCK_FILE = ".prepare.lock"
_INCOMPLETE = "incomplete."  # TFDS's prefix of unfinished folders (constants.INCOMPLETE_PREFIX)


def check_reachable(url: str, timeout: float = 10.0) -> None:
    """Raises ``OSError`` at once if ``url``'s host cannot be reached.

    TFDS's downloader retries ten times with growing back-off (over three minutes) before it
    gives up; this check makes an offline machine fail in seconds instead.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the package's TFDS builders (see the module docstring).

    Args:
        download: If the raw files are not in the manual folder, download them with the
            real download code. Off by default for a builder made by hand; :func:`load`
            turns it on unless a manual folder was named.
        verify: Check raw files against ``SHA256SUMS`` and the built-in digests.
        **kwargs: Passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``,
            ``file_format``, which defaults to ``"array_record"``).
    """

    #: The option that names the folder of raw files (messages say how to set it).
    RAW_FILES_OPTION = "root"

    def __init__(self, *, download: bool = False, verify: bool = True, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self._download = download
        self._verify = verify
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own lookup needs the `importlib_resources` backport on Python >= 3.9.
        return epath.Path(inspect.getfile(cls))

    # ------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def _features(self) -> dict[str, Any]:
        """``DatasetInfo`` keyword arguments: ``features``, ``description``, ..."""

    @abc.abstractmethod
    def find_raw_files(self, folder: Path) -> list[Path]:
        """The raw files of this config under ``folder``; raises ``DataNotFoundError``."""

    @abc.abstractmethod
    def _download_raw(self, dl_manager) -> Path:
        """Downloads and extracts the raw files; returns a folder that holds them."""

    @abc.abstractmethod
    def _read_raw(self, files: list[Path]) -> dict[str, Any]:
        """``{split: data}``, every split parsed and checked."""

    def _check_raw_file(self, path: Path) -> None:
        """Reads one raw file, raising ``DataFormatError`` if it is broken (checksum
        verdicts use it to tell a broken file from a wrong ``SHA256SUMS`` line)."""

    def _fetch(self, dl_manager, url: str) -> Path:
        """Downloads and extracts ``url`` with TFDS's download manager (for the hooks)."""
        check_reachable(url)
        return Path(dl_manager.download_and_extract(url))

    # ------------------------------------------------------------------ the pattern

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            metadata=tfds.core.MetadataDict(),
            # Keep the raw files' order (TFDS would otherwise shuffle by key).
            disable_shuffling=True,
            **self._features(),
        )

    def _locate(self, dl_manager) -> list[Path]:
        manual = getattr(dl_manager, "_manual_dir", None)
        manual = Path(manual) if manual is not None else paths.manual_dir(self.data_dir_root)
        try:
            return self.find_raw_files(manual)
        except DataNotFoundError as missing:
            if not self._download:
                raise
            try:
                folder = self._download_raw(dl_manager)
            except Exception as e:  # any download failure: say what to do instead
                raise DataNotFoundError(
                    f"{missing} Downloading them failed too ({type(e).__name__}: {e})."
                ) from e
            return self.find_raw_files(folder)

    def _log_download_bytes(self) -> None:
        # TFDS prints "Downloading and preparing dataset Unknown size ..." here; what this
        # builder prepares from is said once the raw files are found (_split_generators).
        pass

    def _log_download_done(self) -> None:
        pass  # load() says where the prepared copy is, once it is in place

    def _split_generators(self, dl_manager):
        files = self._locate(dl_manager)
        print(
            f"Preparing {self.name}/{self.builder_config.name} from {files[0].parent}", flush=True
        )
        digests = checksums.verify_files(
            files, verify=self._verify, content_check=self._check_raw_file
        )
        data = self._read_raw(files)
        self.info.metadata[RAW_SHA256] = digests
        return {split: self._generate_examples(d) for split, d in data.items()}

    def raw_sha256(self) -> dict[str, str] | None:
        """``{raw file name: SHA-256}`` recorded when this dataset was prepared, if any."""
        md = self.info.metadata
        if md is None or RAW_SHA256 not in md:
            return None
        return dict(md[RAW_SHA256])


# ----------------------------------------------------------------------------- load


def remove_incomplete(folder: str | os.PathLike) -> list[Path]:
    """Deletes ``incomplete.*`` entries of ``folder`` (left by killed preparations).

    Only call it while holding the folder's lock (:func:`load` does).

    Returns:
        What was deleted.
    """
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.name.startswith(_INCOMPLETE):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    if gone:
        log.info("Removed %d unfinished preparation(s) in %s", len(gone), folder)
    return gone


def _writable(folder: Path) -> bool:
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _refuse_raw_folder(b: RawFilesBuilder, folder: Path, root: Path) -> None:
    """Raw files where the prepared dataset goes: the data directory is a raw-data folder
    (as ``$FLAX_LINOSS_DATA_DIR/uea/<Name>`` was before); never write into it."""
    if not folder.is_dir():
        return
    try:
        files = b.find_raw_files(folder)
    except DataNotFoundError:
        return
    inside = [f for f in files if f.parent == folder]
    if inside:
        raise DataError(
            f"{folder} holds raw files ({inside[0].name}), but it is where the data directory "
            f"{root} keeps the prepared {b.name}/{b.builder_config.name}: preparing would write "
            f"into your raw-data folder. Keep raw files in {root / 'downloads' / 'manual'} "
            f"(or name their folder with {option(b.RAW_FILES_OPTION)}) and point "
            f"{option('data_dir')} (or $FLAX_LINOSS_DATA_DIR) at a folder for prepared data"
        )


def _prepared(b: RawFilesBuilder) -> bool:
    # is_prepared() logs a warning for a version folder that does not exist yet.
    return Path(b.data_path).is_dir() and b.is_prepared()


def _changes(old: dict[str, str] | None, new: dict[str, str]) -> str:
    if old is None:
        return "no digests were recorded when it was prepared"
    parts = [f"{k} changed" for k in new if k in old and old[k] != new[k]]
    parts += [f"{k} is new" for k in new if k not in old]
    parts += [f"{k} is gone" for k in old if k not in new]
    return ", ".join(parts)


def load(
    builder_cls: type[RawFilesBuilder],
    config: Any,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
) -> RawFilesBuilder:
    """Prepares (if needed) and returns a builder whose dataset is ready to read.

    See the module docstring for the steps. ``builder.as_data_source()[split]`` (what
    ``tfds.data_source`` returns) then gives random access to the examples.

    Args:
        builder_cls: A :class:`RawFilesBuilder` subclass.
        config: Its config (a name or a ``BuilderConfig``).
        data_dir: The data directory; ``None`` or ``""`` for the default
            (:func:`flax_linoss.data.paths.data_dir`).
        manual_dir: Folder of the raw files; ``None`` or ``""`` for
            ``<data_dir>/downloads/manual``. A folder named here must hold the files.
        download: Download the raw files when they are in neither place.
        verify: Check raw files' checksums when preparing.

    Returns:
        The prepared builder.

    Raises:
        DataNotFoundError: No raw files (and no download), with where to put them.
        ChecksumError, DataFormatError: A raw file is wrong (prepared data stays as it was).
        DataError: The dataset must be (re)prepared but the data directory is read-only.
    """
    root = paths.data_dir(data_dir)
    explicit = paths.given(manual_dir)
    manual = Path(manual_dir).expanduser().absolute() if explicit else paths.manual_dir(root)
    kw = {"download": download and not explicit, "verify": verify}

    def make(dd: Path) -> RawFilesBuilder:
        return builder_cls(config=config, data_dir=os.fspath(dd), **kw)

    b = make(root)
    folder = Path(b.data_path).parent  # <data_dir>/<builder>/<config>
    _refuse_raw_folder(b, folder, root)
    writable = _writable(folder)
    with _locked(folder) if writable else contextlib.nullcontext():
        if writable:
            remove_incomplete(folder)
        b = make(root)  # after the lock: another process may have prepared it meanwhile
        try:
            files = b.find_raw_files(manual)
        except DataNotFoundError:
            if explicit:
                raise
            files = None
        what = f"{b.name}/{b.builder_config.name}"
        if _prepared(b):
            if files is None:
                return b
            now = checksums.verify_files(files, verify=False)
            recorded = b.raw_sha256()
            if recorded == now:
                return b
            why = _changes(recorded, now)
            if not writable:
                raise DataError(
                    f"The raw files of {what} in {files[0].parent} differ from those it was "
                    f"prepared from ({why}), and {folder} is not writable, so it cannot be "
                    f"prepared again; set {option('data_dir')} (or $FLAX_LINOSS_DATA_DIR) to a "
                    "writable folder"
                )
            log.warning("Preparing %s again: its raw files changed (%s)", what, why)
            b = _reprepare(make, root, manual, folder)
            print(f"Prepared {what} in {b.data_dir}", flush=True)
            return b
        if not writable:
            raise DataError(
                f"{what} is not prepared in {root}, and {folder} is not writable; set "
                f"{option('data_dir')} (or $FLAX_LINOSS_DATA_DIR) to a writable folder"
            )
        with _progress_bars_on_a_terminal():
            b.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
            )
        print(f"Prepared {what} in {b.data_dir}", flush=True)
        return b


@contextlib.contextmanager
def _progress_bars_on_a_terminal():
    """TFDS's progress bars only when stderr is a terminal: in a log file or a notebook's
    captured output they are cursor-movement escapes (``ESC[A``), not bars."""
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(sys.stderr.isatty())
    try:
        yield
    finally:
        tfds.display_progress_bar(before)


def _reprepare(make, root: Path, manual: Path, folder: Path) -> RawFilesBuilder:
    """Prepares into a temporary data dir beside the old copy, then swaps it in."""
    tag = uuid.uuid4().hex[:8]
    tmp_root = folder / f"{_INCOMPLETE}{tag}_reprepare"
    try:
        fresh = make(tmp_root)
        with _progress_bars_on_a_terminal():
            fresh.download_and_prepare(
                download_dir=os.fspath(root / "downloads"),
                download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)),
            )
        target = Path(make(root).data_path)
        replaced = folder / f"{_INCOMPLETE}{tag}_replaced"
        os.replace(target, replaced)
        os.replace(Path(fresh.data_path), target)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return make(root)
