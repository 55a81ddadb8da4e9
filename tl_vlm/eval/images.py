"""Images of the evaluation sets: read lazily from rows, or resolved from URLs to local
files (a COCO root, a shared content cache, ``file://`` URLs, then HTTP)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Union
from typing import TYPE_CHECKING

from tl_vlm.eval.examples import LazyImage

if TYPE_CHECKING:  # imported on first use: importing tl_vlm stays light
    import datasets
    from PIL import Image as PILImage


# --------------------------------------------------------------------------------------
# COCO images
# --------------------------------------------------------------------------------------
class ImageFetchError(OSError):
    """An image URL could not be resolved to a local file.

    Example:
        >>> ImageResolver().resolve("ftp://example.org/a.jpg")
        Traceback (most recent call last):
        ...
        tl_vlm.eval.images.ImageFetchError: cannot resolve image URL 'ftp://example.org/a.jpg': expected http(s):// or file://
    """


def default_image_cache() -> Path:
    """``$TL_VLM_IMAGE_CACHE``, else ``~/.cache/tl_vlm/images``.

    Example:
        >>> import os
        >>> default_image_cache() == (Path(os.environ["TL_VLM_IMAGE_CACHE"])
        ...     if os.environ.get("TL_VLM_IMAGE_CACHE") else Path.home() / ".cache/tl_vlm/images")
        True
    """
    return Path(os.environ.get("TL_VLM_IMAGE_CACHE")
                or Path.home() / ".cache" / "tl_vlm" / "images")


class ImageResolver:
    """Turns an image URL (COCO Karpathy's ``url``) into a local file, trying in order:

    1. ``coco_root / filepath / filename`` (``--coco-root``: the unzipped COCO images);
    2. the content cache ``cache_dir / sha1(url)`` (shared by shards: downloads are
       written to a temporary file and renamed into place);
    3. a ``file://`` URL, read in place;
    4. an HTTP GET with ``retries`` attempts, stored in the cache; failing that, an
       :class:`ImageFetchError` that says how to provide the images offline.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> tmpdir = tempfile.TemporaryDirectory()
        >>> tmp = pathlib.Path(tmpdir.name)
        >>> Image.new("RGB", (4, 4), "red").save(tmp / "a.png")
        >>> resolver = ImageResolver(cache_dir=tmp / "cache")
        >>> resolver.resolve((tmp / "a.png").as_uri()) == tmp / "a.png"
        True
        >>> resolver.open({"url": (tmp / "a.png").as_uri()}).getpixel((0, 0))
        (255, 0, 0)
        >>> (tmp / "root" / "val2014").mkdir(parents=True)
        >>> Image.new("RGB", (4, 4)).save(tmp / "root" / "val2014" / "b.jpg")
        >>> ImageResolver(coco_root=tmp / "root").resolve(
        ...     "http://images.cocodataset.org/val2014/b.jpg", "val2014", "b.jpg").name
        'b.jpg'
        >>> tmpdir.cleanup()
    """

    def __init__(self, coco_root: Union[str, Path, None] = None,
                 cache_dir: Union[str, Path, None] = None, retries: int = 3,
                 timeout: float = 30.0, backoff: float = 1.0) -> None:
        self.coco_root = None if coco_root is None else Path(coco_root).expanduser()
        if self.coco_root is not None and not self.coco_root.is_dir():
            raise FileNotFoundError(f"coco_root {str(coco_root)!r} is not a directory; "
                                    f"expected the folder holding val2014/ (COCO images)")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_image_cache()
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def cache_path(self, url: str) -> Path:
        return self.cache_dir / hashlib.sha1(url.encode()).hexdigest()

    def resolve(self, url: str, filepath: Optional[str] = None,
                filename: Optional[str] = None) -> Path:
        """A local file holding the image at ``url`` (downloaded into the cache if needed)."""
        tried = []
        if self.coco_root is not None and filename:
            local = self.coco_root / (filepath or "") / filename
            if local.is_file():
                return local
            tried.append(f"{local} (missing)")
        cached = self.cache_path(url)
        if cached.is_file():
            return cached
        tried.append(f"{cached} (not cached)")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            local = Path(urllib.request.url2pathname(parsed.path))
            if local.is_file():
                return local
            raise ImageFetchError(f"{url}: no such file {local}")
        if parsed.scheme not in ("http", "https"):
            raise ImageFetchError(f"cannot resolve image URL {url!r}: expected http(s):// "
                                  f"or file://")
        self._store(cached, self._download(url, tried))
        return cached

    def resolve_row(self, row: Mapping[str, Any]) -> Path:
        """:meth:`resolve` for a COCO Karpathy row (``url``, ``filepath``, ``filename``)."""
        if "url" not in row:
            raise KeyError(f"expected a row with a 'url' column, got columns {sorted(row)}")
        return self.resolve(row["url"], row.get("filepath"), row.get("filename"))

    def open(self, row_or_url: Union[str, Mapping[str, Any]]) -> "PILImage.Image":
        """The image as an RGB PIL image."""
        from PIL import Image

        path = (self.resolve(row_or_url) if isinstance(row_or_url, str)
                else self.resolve_row(row_or_url))
        with Image.open(path) as im:
            return im.convert("RGB")

    def _download(self, url: str, tried: list[str]) -> bytes:
        last: Optional[BaseException] = None
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "tl_vlm"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = response.read()
                _check_image_bytes(url, data)
                return data
            except urllib.error.HTTPError as err:
                last = err
                if 400 <= err.code < 500 and err.code != 429:  # will not get better
                    break
            except (OSError, ValueError) as err:  # URLError, timeouts, refused sockets
                last = err
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise ImageFetchError(
            f"could not download {url} after {self.retries} attempt(s): {last}. Tried "
            f"first: {'; '.join(tried)}. To run without network, pass coco_root=DIR "
            f"(--coco-root DIR) holding <filepath>/<filename> (the COCO val2014 images), "
            f"or fill the image cache {self.cache_dir} (one file per image, named "
            f"sha1(url)) on a machine that can reach the URL, e.g. with "
            f"ImageResolver().resolve_row(row) for the selected rows.") from last

    def _store(self, target: Path, data: bytes) -> None:
        """Write into the cache atomically: concurrent shards see a whole file or none."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _check_image_bytes(url: str, data: bytes) -> None:
    """Refuse to cache a response that is not an image (an HTML error page, say)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{url} did not return an image ({len(data)} bytes: {err})") from err


class RowImage(LazyImage):
    """The image of one dataset row, decoded only when a batch needs it.

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (4, 4), "red")]})
        >>> RowImage(ds, 0).load().getpixel((0, 0))
        (255, 0, 0)
    """

    def __init__(self, rows: "datasets.Dataset", index: int, column: str = "image") -> None:
        self.rows, self.index, self.column = rows, int(index), column

    def load(self) -> "PILImage.Image":
        image = self.rows[self.index][self.column]
        return image.convert("RGB") if image.mode != "RGB" else image

    def __repr__(self) -> str:
        return f"RowImage(row {self.index}, column {self.column!r})"


class UrlImage(LazyImage):
    """A COCO row's image, resolved by an :class:`ImageResolver` when first needed.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> Image.new("RGB", (4, 4), "blue").save(f"{tmp.name}/b.png")
        >>> url = pathlib.Path(f"{tmp.name}/b.png").as_uri()
        >>> UrlImage(ImageResolver(cache_dir=tmp.name), {"url": url}).load().getpixel((0, 0))
        (0, 0, 255)
        >>> tmp.cleanup()
    """

    def __init__(self, resolver: "ImageResolver", row: Mapping[str, Any]) -> None:
        self.resolver = resolver
        self.row = {k: row.get(k) for k in ("url", "filepath", "filename")}

    def resolve(self) -> Path:
        """The local file (downloaded into the cache if needed)."""
        return self.resolver.resolve_row(self.row)

    def load(self) -> "PILImage.Image":
        return self.resolver.open(self.row)

    def __repr__(self) -> str:
        return f"UrlImage({self.row['url']!r})"
