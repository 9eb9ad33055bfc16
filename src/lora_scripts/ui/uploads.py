"""Image uploads read as they stream in, so that a file or a request over its limit is refused as soon as that is
known (Content-Length first, then bytes counted while reading), never after the whole body was received.

Files go to temporary files in the workspace's state folder; they are checked (a readable image, at most
MAX_PIXELS) and only then placed, without ever replacing an existing file.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError

from ..atomic import _umask
from ..data.images import IMAGE_EXTENSIONS, MAX_PIXELS

try:  # python-multipart >= 0.0.13 is imported as python_multipart; older ones as multipart
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover
    from multipart.multipart import MultipartParser, parse_options_header

MAX_UPLOAD_BYTES = 25 * 2**20  # one image
MAX_REQUEST_BYTES = 400 * 2**20  # one upload request (many images); more: a second batch
MAX_FILES = 1000
COMMON_IMAGES = ".png, .jpg, .jpeg, .webp, .bmp, .gif, .tif"


@dataclass
class Received:
    name: str  # the file name the browser gave, without folders
    tmp: Path
    size: int = 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _file_name(raw: bytes) -> str:
    """The name part of what the browser sent (Windows browsers may send C:\\\\photos\\\\a.png)."""
    name = PureWindowsPath(raw.decode("utf-8", errors="replace")).name
    if not name or name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        shown = name or raw.decode("utf-8", errors="replace")
        hidden = " (a name starting with '.' is a hidden file)" if name.startswith(".") else ""
        raise HTTPException(400, f"{shown!r}: only images can be uploaded ({COMMON_IMAGES} and the other formats "
                                 f"Pillow reads){hidden}")
    return name


class _Parts:
    """python-multipart callbacks: each file part streamed into its own temporary file, with its size counted."""

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = tmp_dir
        self.files: list[Received] = []
        self.current: Received | None = None
        self._handle = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.data, "on_part_end": self.end}

    def begin(self) -> None:
        self._headers, self.current = {}, None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in options:
            return  # a plain form field: not ours, its bytes are only counted
        if len(self.files) >= MAX_FILES:
            raise HTTPException(413, f"more than {MAX_FILES} files in one upload; add them in batches")
        name = _file_name(options[b"filename"])
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
        self._handle = os.fdopen(fd, "wb")
        self.current = Received(name, Path(tmp))
        self.files.append(self.current)

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.current is None:
            return
        self.current.size += end - start
        if self.current.size > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{self.current.name}: larger than {_mb(MAX_UPLOAD_BYTES)}; "
                                     "export it smaller (training uses at most a few megapixels)")
        self._handle.write(data[start:end])

    def end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.current = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


async def receive(request: Request, tmp_dir: Path) -> list[Received]:
    """The request's image files as temporary files; HTTPException (413/400) the moment a limit is passed."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise HTTPException(400, f"Content-Length {length!r} is not a number")
        if int(length) > MAX_REQUEST_BYTES:
            raise HTTPException(413, f"the upload is {_mb(int(length))}, over {_mb(MAX_REQUEST_BYTES)} in one go; "
                                     "add the images in smaller batches")
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not options.get(b"boundary"):
        raise HTTPException(400, "send the images as multipart/form-data, one 'files' part per image")
    parts = _Parts(tmp_dir)
    parser = MultipartParser(options[b"boundary"], parts.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_REQUEST_BYTES:
                raise HTTPException(413, f"the upload is over {_mb(MAX_REQUEST_BYTES)} in one go; add the images "
                                         "in smaller batches")
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        parts.close()
        discard(parts.files)
        raise
    except Exception as exc:  # a malformed body: python-multipart's errors, a client that went away
        parts.close()
        discard(parts.files)
        raise HTTPException(400, f"the upload could not be read as multipart/form-data ({exc})") from None
    if not parts.files:
        raise HTTPException(400, "no files in the upload; choose one or more images")
    return parts.files


def check_image(item: Received) -> None:
    """A readable image of at most MAX_PIXELS (what training accepts), or HTTPException 400 naming the file."""
    problem = too_large_to_show(item.tmp)
    if problem:
        raise HTTPException(400, f"{item.name}: {problem}")
    try:
        with Image.open(item.tmp) as im:
            im.verify()
    except UnidentifiedImageError:
        raise HTTPException(400, f"{item.name}: not a readable image (not an image, or a format Pillow cannot "
                                 "read)") from None
    except Exception as exc:  # any decoder error on untrusted bytes: the file is refused, the server goes on
        reason = str(exc).replace(str(item.tmp), item.name) or type(exc).__name__
        raise HTTPException(400, f"{item.name}: not a readable image ({reason})") from None


def too_large_to_show(path: Path) -> str | None:
    """Why an image is too large to decode (a decompression bomb: a few bytes announcing 400 Mpx), from its
    header alone; None when it is not (or is not an image at all: that is for check_image to say)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:  # PIL's own limit: its message has the pixel count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)) / 1e6:.0f} Mpx" if found else "far"
        return f"image too large ({pixels}, over {MAX_PIXELS // 1_000_000} Mpx); downscale it"
    except Exception:
        return None
    if width * height > MAX_PIXELS:
        return f"image too large ({width}x{height}, over {MAX_PIXELS // 1_000_000} Mpx); downscale it"
    return None


def place(item: Received, folder: Path) -> tuple[Path, str]:
    """Put an upload in `folder` without replacing anything: (path, "saved" | "renamed" | "duplicate")."""
    stem, suffix = Path(item.name).stem, Path(item.name).suffix
    os.chmod(item.tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the image private to the server's user
    for n in range(1, 10_000):
        dest = folder / (item.name if n == 1 else f"{stem}_{n}{suffix}")
        if os.path.lexists(dest):
            # A link is never compared (it may lead out of the workspace) nor replaced: take the next name.
            if not dest.is_symlink() and dest.is_file() and filecmp.cmp(dest, item.tmp, shallow=False):
                return dest, "duplicate"
            continue
        try:
            _link_or_copy(item.tmp, dest)
        except FileExistsError:  # another upload took the name a moment ago
            continue
        return dest, "saved" if n == 1 else "renamed"
    raise HTTPException(409, f"{item.name}: too many files with this name in {folder.name}; rename it")


def _link_or_copy(src: Path, dest: Path) -> None:
    """Create `dest` with src's bytes; never replaces an existing file (FileExistsError)."""
    try:
        os.link(src, dest)  # atomic, and fails if dest exists
    except FileExistsError:
        raise
    except OSError:  # another disk, or one without hard links
        with open(src, "rb") as f, open(dest, "xb") as out:
            shutil.copyfileobj(f, out)


def discard(items: list[Received]) -> None:
    for item in items:
        item.tmp.unlink(missing_ok=True)
