"""An LRU cache of text features per prompt, bounded in bytes, shared by all requests.

Detection prompts repeat (the same class list, the same chunks of a large vocabulary), so the
language engine runs once per distinct prompt text. Lives on the event loop: lookups, inserts
and the de-duplication of concurrent misses need no lock.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class PromptFeatures:
    """One text as the fusion engine takes it: (T,) token ids and (T, D) encoder features."""

    input_ids: Tensor
    hidden: Tensor

    @property
    def nbytes(self) -> int:
        return (self.input_ids.element_size() * self.input_ids.nelement()
                + self.hidden.element_size() * self.hidden.nelement())


Compute = Callable[[list[str]], Awaitable[Sequence[PromptFeatures]]]
OnLookup = Callable[[int, int], None]  # (hits, misses)


class TextFeatureCache:
    """Text -> `PromptFeatures`, least recently used evicted past `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int, on_lookup: OnLookup | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PromptFeatures] = OrderedDict()
        self._bytes = 0
        self._pending: dict[str, asyncio.Future[PromptFeatures]] = {}
        self._on_lookup = on_lookup

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    async def get(self, texts: Sequence[str], compute: Compute) -> list[PromptFeatures]:
        """Features of each text; the missing ones computed by one `compute` call.

        A text already being computed for another request is awaited, not computed twice. If
        `compute` fails, the texts it was computing are not cached and every waiter gets the
        error.
        """
        found: dict[str, PromptFeatures] = {}
        waiting: dict[str, asyncio.Future[PromptFeatures]] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):  # unique, in order
            entry = self._entries.get(text)
            if entry is not None:
                self._entries.move_to_end(text)
                found[text] = entry
            elif text in self._pending:
                waiting[text] = self._pending[text]
            else:
                missing.append(text)
        if self._on_lookup is not None:
            self._on_lookup(len(found) + len(waiting), len(missing))
        if missing:
            loop = asyncio.get_running_loop()
            futures = {text: loop.create_future() for text in missing}
            self._pending.update(futures)
            try:
                computed = await compute(missing)
            except BaseException as exc:
                for future in futures.values():
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                for text in missing:
                    self._pending.pop(text, None)
            for text, features in zip(missing, computed, strict=True):
                futures[text].set_result(features)
                found[text] = features
                self._put(text, features)
        for text, future in waiting.items():
            found[text] = await future
        return [found[text] for text in texts]

    def _put(self, text: str, features: PromptFeatures) -> None:
        size = features.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop(text, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[text] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
