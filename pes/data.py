"""MNIST and Fashion-MNIST from their IDX files: find, verify, download, split.

A dataset is four IDX files (each plain or gzipped, ``NAME`` or ``NAME.gz``)::

    train-images-idx3-ubyte   60000 x 28 x 28 uint8      t10k-images-idx3-ubyte   10000 x 28 x 28
    train-labels-idx1-ubyte   60000 uint8 in 0..9        t10k-labels-idx1-ubyte   10000

:func:`load` returns a :class:`Dataset` of numpy arrays ready for JAX: images float32 in [0, 1]
flattened to 784, labels int32. The validation split is fixed: the **last**
``validation_size`` (default 10000) examples of the training file; ``train`` is the rest (the
first 50000), ``test`` is the t10k file. Arrays are read-only and shared between calls.

Where :func:`load` looks. An explicit location is authoritative: when one is given, only it
is searched and a missing or incomplete folder is an error naming it (a mistyped ``--data-dir``
must not silently train on other data). The first explicit one of these wins:

1. ``data_dir`` (what ``--data-dir`` passes): ``data_dir/<name>``, then ``data_dir`` itself;
2. ``$PES_DATA_DIR/<name>`` (a root holding one folder per dataset; files lying directly in
   ``$PES_DATA_DIR`` are not taken, so pointing it at an MNIST folder cannot make the default
   Fashion-MNIST silently load MNIST);
3. ``$PES_CACHE_DIR/<name>`` (the download cache, set explicitly).

With none of them, the default search order applies, first match wins (a directory matches
when all four files are there):

1. Debian's ``dataset-fashion-mnist`` package: ``/usr/share/datasets/fashion-mnist``
   (Fashion-MNIST only);
2. the download cache: ``$XDG_CACHE_HOME/pes/<name>``, else ``~/.cache/pes/<name>`` (what
   :func:`download` and ``pes data download NAME`` fill).

Every default location holds the same dataset, so falling through is harmless;
``Dataset.source`` says which one was used. Nothing found raises
:class:`DatasetNotFoundError` (a FileNotFoundError) naming every path searched, which explicit
setting chose them (``explicit``), and how to get the data; a truncated or corrupt file raises
:class:`CorruptFileError` naming the file.

:func:`download` fetches the canonical ``.gz`` files into the cache, checks each one's SHA-256
against :data:`CHECKSUMS` (see :data:`CHECKSUM_SOURCES` for where every digest comes from) and
writes atomically (a temporary file in the same folder, renamed into place once verified), so an
interrupted or corrupt download leaves no file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET_NAMES = ("mnist", "fashion-mnist")
VALIDATION_SIZE = 10000
IMAGE_SHAPE = (28, 28)

# split -> (images file, labels file), file names without the optional ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(f for pair in FILES.values() for f in pair)

DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

# Mirrors tried in order by download(); each serves the four NAME.gz files under this prefix.
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

# SHA-256 of the canonical gzipped files, as served by the mirrors above.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# SHA-256 of the *decompressed* files. A mirror that recompressed the archives (Debian's
# package did: its .gz files differ from the canonical ones byte for byte) is accepted when the
# payload matches. None where unknown.
CONTENT_CHECKSUMS: dict[str, dict[str, str] | None] = {
    "mnist": None,
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz":
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz":
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz":
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

CHECKSUM_SOURCES = {
    "mnist": (
        "CHECKSUMS['mnist']: not computed here (no copy of MNIST on the machine that wrote this "
        "file). Taken from published checksum tables that agree digit for digit across several "
        "independent public projects (download scripts of the TensorFlow and PyTorch mirrors' "
        "users); they match the canonical files of 9912422, 28881, 1648877 and 4542 bytes."
    ),
    "fashion-mnist": (
        "CHECKSUMS['fashion-mnist']: the canonical archives of zalandoresearch/fashion-mnist "
        "(26421880, 29515, 4422102, 5148 bytes; MD5s as in its README), from published "
        "checksum tables that agree across independent public projects. "
        "CONTENT_CHECKSUMS['fashion-mnist']: computed here from the decompressed files of "
        "Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 (whose recompressed .gz "
        "files have other digests)."
    ),
}


# ----------------------------------------------------------------------------------- errors


class DatasetNotFoundError(FileNotFoundError):
    """No searched location holds all four files of the dataset. ``explicit``: the setting
    that chose the location ('--data-dir', '$PES_DATA_DIR', '$PES_CACHE_DIR'), or None when the
    default search order was used."""

    def __init__(self, message: str, explicit: str | None = None):
        super().__init__(message)
        self.explicit = explicit


class CorruptFileError(ValueError):
    """An IDX file is truncated, has a bad header or is not valid gzip. ``path``: the file."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason} (delete it and fetch the dataset again)")


class ChecksumError(OSError):
    """A downloaded file's SHA-256 is not the expected one (nothing was written)."""


# ------------------------------------------------------------------------------- IDX format

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        raise CorruptFileError(path, f"not a readable gzip file ({e})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzipped, told apart by content) into a native-endian array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions d, then d big-endian uint32 sizes.
    Raises CorruptFileError (naming the file) for a bad header or a size mismatch.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise CorruptFileError(path, f"only {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptFileError(path, f"bad IDX magic number {data[:4].hex()}")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptFileError(path, "truncated IDX header")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptFileError(
            path, f"{what}: header says shape {shape} ({expected} bytes), file has {len(data)}"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when the name ends in ``.gz``. Returns the path."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"IDX has no type for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


# ---------------------------------------------------------------------------- finding files


def check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset={name!r} is not known; known datasets: {DATASET_NAMES}")
    return name


def default_cache_dir(name: str | None = None) -> Path:
    """The download cache: $PES_CACHE_DIR, else $XDG_CACHE_HOME/pes, else ~/.cache/pes; with
    ``name``, that dataset's folder in it."""
    root = os.environ.get("PES_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "pes"
    return base / check_name(name) if name is not None else base


def explicit_source(data_dir: str | os.PathLike | None = None) -> tuple[str, Path] | None:
    """The explicit location in force, as (setting, folder), or None: ``data_dir`` first, then
    $PES_DATA_DIR, then $PES_CACHE_DIR (empty variables count as unset)."""
    if data_dir is not None:
        return "--data-dir", Path(data_dir).expanduser()
    for var in ("PES_DATA_DIR", "PES_CACHE_DIR"):
        value = os.environ.get(var)
        if value:
            return f"${var}", Path(value).expanduser()
    return None


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories :func:`find` tries for dataset ``name``, in order: only the explicit
    location's (see :func:`explicit_source`) when there is one, else Debian's and the cache."""
    check_name(name)
    explicit = explicit_source(data_dir)
    if explicit is not None:
        setting, root = explicit
        return [root / name, root] if setting == "--data-dir" else [root / name]
    paths: list[Path] = []
    if name in DEBIAN_DIRS:
        paths.append(DEBIAN_DIRS[name])
    paths.append(default_cache_dir(name))
    return paths


def _file_in(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _how_to_get(name: str) -> str:
    ways = [f"run `pes data download {name}` (fetches into {default_cache_dir(name)})"]
    if name in DEBIAN_DIRS:
        ways.insert(0, f"`apt-get install dataset-{name}` (installs into {DEBIAN_DIRS[name]})")
    ways.append("or point --data-dir / $PES_DATA_DIR at a folder holding the four files "
                f"{', '.join(FILE_NAMES)} (each may be gzipped)")
    return "; ".join(ways)


def find(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the four files of ``name`` (keys: the FILE_NAMES stems), from the first
    directory of :func:`search_paths` that holds all four. Raises DatasetNotFoundError."""
    tried = []
    for directory in search_paths(name, data_dir):
        found = {stem: _file_in(directory, stem) for stem in FILE_NAMES}
        if all(found.values()):
            return found  # type: ignore[return-value]
        missing = [s for s, p in found.items() if p is None]
        if not directory.is_dir():
            tried.append(f"{directory} (no such folder)")
        elif len(missing) == len(FILE_NAMES):
            tried.append(f"{directory} (none of the 4 files)")
        else:
            tried.append(f"{directory} (has {4 - len(missing)} of 4 files; missing "
                         f"{', '.join(missing)})")
    explicit = explicit_source(data_dir)
    if explicit is None:
        head = f"dataset {name!r} not found. Searched, in order:"
    else:
        head = (f"dataset {name!r} not found in {explicit[0]} {explicit[1]} (an explicit "
                "location is the only one searched). Searched:")
    raise DatasetNotFoundError(
        head + "\n  " + "\n  ".join(tried) + f"\nTo get it: {_how_to_get(name)}.",
        explicit=None if explicit is None else explicit[0],
    )


# -------------------------------------------------------------------------------- loading


@dataclass(frozen=True, eq=False)
class Dataset:
    """One dataset's three splits. Images: float32 [n, 784] in [0, 1]; labels: int32 [n].

    The validation split is the last ``validation_size`` examples of the training file; train
    is the examples before them; test is the t10k file. ``source``: the folder read.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path
    image_shape: tuple[int, int] = IMAGE_SHAPE
    num_classes: int = 10

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of 'train', 'valid' or 'test'."""
        if which not in ("train", "valid", "test"):
            raise ValueError(f"split={which!r} must be 'train', 'valid' or 'test'")
        return getattr(self, f"{which}_images"), getattr(self, f"{which}_labels")

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.train_labels)}, "
                f"valid={len(self.valid_labels)}, test={len(self.test_labels)}, "
                f"source={str(self.source)!r})")


def _images(path: Path) -> np.ndarray:
    raw = read_idx(path)
    if raw.ndim != 3 or raw.dtype != np.uint8:
        raise CorruptFileError(path, f"expected uint8 images [n, h, w], got {raw.dtype} "
                               f"{raw.shape}")
    return raw


def _labels(path: Path, count: int) -> np.ndarray:
    raw = read_idx(path)
    if raw.ndim != 1 or raw.dtype != np.uint8:
        raise CorruptFileError(path, f"expected uint8 labels [n], got {raw.dtype} {raw.shape}")
    if raw.shape[0] != count:
        raise CorruptFileError(path, f"{raw.shape[0]} labels for {count} images")
    if raw.size and raw.max() > 9:
        raise CorruptFileError(path, f"label {int(raw.max())} is outside 0..9")
    return raw


def _frozen(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x


_CACHE: dict[tuple, Dataset] = {}


def load(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = VALIDATION_SIZE,
) -> Dataset:
    """Load ``name`` ('mnist' or 'fashion-mnist') from the first location that has it.

    Returns a Dataset (see its docstring for shapes and the fixed validation split). Loaded
    arrays are kept for the life of the process, keyed by the files and their mtimes.
    """
    paths = find(check_name(name), data_dir)
    if isinstance(validation_size, bool) or not isinstance(validation_size, int) \
            or validation_size < 1:
        raise ValueError(f"validation_size={validation_size!r} must be a positive int")
    stamp = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in paths.values())
    key = (name, validation_size, stamp)
    if key in _CACHE:
        return _CACHE[key]
    train_x = _images(paths[FILES["train"][0]])
    train_y = _labels(paths[FILES["train"][1]], len(train_x))
    test_x = _images(paths[FILES["test"][0]])
    test_y = _labels(paths[FILES["test"][1]], len(test_x))
    if train_x.shape[1:] != test_x.shape[1:]:
        raise CorruptFileError(paths[FILES["test"][0]], f"image shape {test_x.shape[1:]} differs "
                               f"from the training images' {train_x.shape[1:]}")
    if validation_size >= len(train_x):
        raise ValueError(f"validation_size={validation_size} leaves no training examples "
                         f"(the training file has {len(train_x)})")
    flat = lambda x: _frozen(x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0))
    label = lambda y: _frozen(y.astype(np.int32))
    cut = len(train_x) - validation_size
    ds = Dataset(
        name=name,
        train_images=flat(train_x[:cut]), train_labels=label(train_y[:cut]),
        valid_images=flat(train_x[cut:]), valid_labels=label(train_y[cut:]),
        test_images=flat(test_x), test_labels=label(test_y),
        source=paths[FILES["train"][0]].parent,
        image_shape=tuple(train_x.shape[1:]),  # type: ignore[arg-type]
    )
    if len(_CACHE) >= 4:
        _CACHE.clear()
    _CACHE[key] = ds
    return ds


# ------------------------------------------------------------------------------ downloading


def _sha256(path: Path, decompress: bool = False) -> str:
    digest = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(name: str, path: Path) -> bool:
    """True when ``path`` (a NAME.gz of dataset ``name``) has the canonical SHA-256, or its
    decompressed payload has the known content digest."""
    if _sha256(path) == CHECKSUMS[name][path.name]:
        return True
    content = CONTENT_CHECKSUMS.get(name)
    if content is None:
        return False
    try:
        return _sha256(path, decompress=True) == content[path.name]
    except (EOFError, OSError, zlib.error):
        return False


def _fetch(url: str, target: Path, name: str, timeout: float) -> None:
    """Download ``url`` into ``target`` atomically: stream into a temporary file beside it,
    check the length and SHA-256, then rename. Any failure removes the temporary file."""
    expected = CHECKSUMS[name][target.name]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
            if length is not None and received != int(length):
                raise OSError(f"connection closed after {received} of {length} bytes")
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != expected and not _content_matches(name, tmp, target.name):
            raise ChecksumError(f"SHA-256 {got} does not match the expected {expected}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _content_matches(name: str, path: Path, fname: str) -> bool:
    content = CONTENT_CHECKSUMS.get(name)
    if content is None:
        return False
    try:
        return _sha256(path, decompress=True) == content[fname]
    except (EOFError, OSError, zlib.error):
        return False


def download(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    *,
    force: bool = False,
    timeout: float = 60.0,
    progress: Callable[[str], object] | None = None,
) -> Path:
    """Fetch the four canonical ``.gz`` files of ``name`` into ``cache_dir`` (default: the
    cache folder :func:`load` searches, see :func:`default_cache_dir`) and return that folder.

    Each file is checked against CHECKSUMS[name] (a recompressed copy whose payload matches
    CONTENT_CHECKSUMS is accepted too) and renamed into place only once verified; files already
    there and verified are kept unless ``force``. ``base_url``: fetch ``base_url/FILE.gz``
    instead of trying MIRRORS[name] in order. ``progress``: optional callable(str) for messages.

    Raises ChecksumError when every mirror served a file with the wrong digest, OSError (naming
    every URL tried and why it failed) when none served it. Either way nothing is written.
    """
    check_name(name)
    target_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    target_dir.mkdir(parents=True, exist_ok=True)
    bases = (base_url,) if base_url is not None else MIRRORS[name]
    say = progress or (lambda msg: None)
    for stem in FILE_NAMES:
        fname = f"{stem}.gz"
        target = target_dir / fname
        if target.exists() and not force:
            if verify_file(name, target):
                say(f"{target}: present, checksum ok")
                continue
            say(f"{target}: checksum mismatch, fetching again")
        errors: list[str] = []
        bad_digest = False
        for base in bases:
            url = base.rstrip("/") + "/" + fname
            say(f"fetching {url}")
            try:
                _fetch(url, target, name, timeout)
                break
            except ChecksumError as e:
                bad_digest = True
                errors.append(f"{url}: {e}")
            except (OSError, ValueError, http.client.HTTPException) as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
        else:
            error = ChecksumError if bad_digest else OSError
            raise error(
                f"could not download {fname} of {name} into {target_dir} (nothing was "
                "written):\n  " + "\n  ".join(errors)
            )
        say(f"{target}: checksum ok")
    return target_dir


# ------------------------------------------------------------------------------ downsampling


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of exact area averaging (box filter with fractional edges)."""
    scale = size_in / size_out
    m = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return m / scale


def downsample(images: np.ndarray, size: int = 8, image_shape=IMAGE_SHAPE) -> np.ndarray:
    """Area-average [n, h*w] images to [n, size*size] (e.g. 28x28 -> 8x8 for the learned
    optimizer's small tasks). Each output pixel is the mean of the input area it covers, so
    values stay in [0, 1]. Returns float32."""
    h, w = image_shape
    x = np.asarray(images, np.float32).reshape(-1, h, w)
    rows, cols = _area_matrix(h, size), _area_matrix(w, size)
    out = np.einsum("ih,nhw,jw->nij", rows, x, cols, optimize=True)
    return out.reshape(len(x), size * size).astype(np.float32)
