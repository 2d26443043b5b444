"""A value built in a background thread: the page comes up while the models load."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Loading(Generic[T]):
    """``imports()`` then ``build()`` run in a daemon thread from ``start()``; ``get()`` waits
    for the value, ``imported()`` for the imports only.

    Two threads importing transformers at once can fail ("ImportError" from a partly
    initialised module): a request that needs the heavy modules before the value (reading an
    upload) waits for ``imported()``, so this thread is the only one importing them.
    A failure is kept and raised again by every ``get()``, so each request that needed the
    value reports it rather than hanging.
    """

    def __init__(self, build: Callable[[], T], imports: Callable[[], None] | None = None):
        self._build, self._imports = build, imports
        self._imported = threading.Event()
        self._done = threading.Event()
        self._value: T | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mrg-loading", daemon=True)

    @classmethod
    def of(cls, value: T) -> Loading[T]:
        """An already loaded value."""
        loading = cls(lambda: value)
        loading._run()
        return loading

    def start(self) -> Loading[T]:
        if not self._done.is_set() and not self._thread.is_alive():
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            if self._imports is not None:
                self._imports()
            self._imported.set()
            self._value = self._build()
        except BaseException as err:  # noqa: BLE001 — re-raised by get()
            self.error = err
        finally:
            self._imported.set()
            self._done.set()

    def imported(self) -> None:
        """Wait until the heavy modules are imported (or the loading has failed)."""
        self.start()
        self._imported.wait()

    def ready(self) -> bool:
        """Whether the build has finished (with a value or an error)."""
        return self._done.is_set()

    def succeeded(self) -> bool:
        """Whether the build has finished with a value (``get()`` returns at once)."""
        return self._done.is_set() and self.error is None

    def get(self, timeout: float | None = None) -> T:
        self.start()
        if not self._done.wait(timeout):
            raise TimeoutError("still loading")
        if self.error is not None:
            raise RuntimeError("the models could not be loaded") from self.error
        return self._value
