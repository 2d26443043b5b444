"""Reading uploaded files once, safely when many users upload the same file.

Gradio moves each upload to ``<upload folder>/<sha256 of its content>/<file name>``, so users
who upload the same file (a class trying the same example) share one path. The demo deletes
an upload as soon as it is read: a DICOM header may hold patient identifiers and the server
keeps no copy on disk. Deleting it would break every other reader of the shared path, so the
first reader keeps the bytes in memory for ``grace_s`` seconds: a later reader of the same path
(necessarily the same content, since the path holds its hash) gets them from there. Nothing is
written back to disk and the memory is released after the grace period.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from mrg.imaging import ImageError


class UploadGone(ImageError):
    """The upload was deleted (read and forgotten) before this request could read it."""


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


class UploadReader:
    """``read(path)`` → the file's bytes; files in Gradio's upload folder are deleted once read.

    Thread-safe. Files elsewhere (examples, dataset images) are read and left alone.
    """

    def __init__(
        self,
        grace_s: float = 120.0,
        wait_s: float = 2.0,
        folder: Callable[[], Path] = upload_folder,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``wait_s``: how long a reader waits for a file Gradio has not moved into place yet
        (the move runs as a background task after the upload request answers)."""
        self.grace_s, self.wait_s, self.folder, self.clock = grace_s, wait_s, folder, clock
        self._recent: dict[Path, tuple[bytes, float]] = {}  # path → (bytes, time of first read)
        self._lock = threading.Lock()

    def read(self, path: str | Path) -> bytes:
        path = Path(path).resolve()
        if self.folder() not in path.parents:
            return path.read_bytes()
        deadline = time.monotonic() + self.wait_s
        while True:
            with self._lock:
                self._expire()
                if path in self._recent:
                    return self._recent[path][0]
                if path.is_file():
                    data = path.read_bytes()
                    path.unlink(missing_ok=True)
                    self._recent[path] = (data, self.clock())
                    return data
            if time.monotonic() >= deadline:
                raise UploadGone(
                    "The uploaded file is no longer on the server: uploads are deleted once read, "
                    "to keep no copy of patient data. Please upload it again."
                )
            time.sleep(0.05)

    def held(self) -> int:
        """How many uploads are held in memory now (after expiring old ones)."""
        with self._lock:
            self._expire()
            return len(self._recent)

    def _expire(self) -> None:
        now = self.clock()
        for path in [p for p, (_, at) in self._recent.items() if now - at > self.grace_s]:
            del self._recent[path]
