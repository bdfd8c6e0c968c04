"""Streaming detokenizer: token ids in one at a time, final text pieces out, linear in the output length.

Contract:
  - `StreamingDetokenizer(decode, stop=())`: `decode(ids) -> str` is the tokenizer's decode (`Engine.decode`, which
    skips special tokens); `stop` is a sequence of non-empty stop strings.
  - `add(token_id) -> str`: the text that this token made final, possibly "". `finish() -> str`: the rest; after it,
    `text` is the final text and `add` is refused. `stopped` turns True when a stop string appears; later `add`
    calls return "" (the caller ends the sequence).
  - The final text is `decode(all ids)` cut before the first occurrence of any stop string, whatever the
    tokenizer. The pieces returned by `add` and `finish` concatenate to it when the decode of a window that
    starts at a character boundary is the matching part of the decode of the whole (byte-level BPE on any ids;
    SentencePiece with byte fallback on valid UTF-8). A decoder can rewrite text across windows (byte fallback
    turns a run of byte tokens that is not valid UTF-8 into one U+FFFD per byte, valid bytes included); there the
    pieces differ from the final text (nothing handed out is repeated), and `text` is still the decode of all ids.
  - Incomplete UTF-8 (a decode ending in U+FFFD) is held back until its character completes. Text that could be the
    start of a stop string is held back until it cannot be, so no piece ever carries a stop string or a part of one
    that completes later.
  - Cost: each `add` decodes only the ids since the last safe boundary, together with the chunk before it as a
    prefix (vLLM's prefix / read offsets; the prefix keeps SentencePiece's leading space, which the decode of a
    suffix alone would drop): O(1) ids per token for ordinary text. `finish()` decodes all ids once. The total ids
    decoded grow linearly with the output (tests/test_detokenizer.py counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decode produces for an incomplete UTF-8 sequence


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = (stop,)
        self.stop = tuple(stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: {s!r} is not a non-empty string; give stop strings of at least one character")
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: the last committed chunk, decoded as context for the next one
        self._read = 0  # ids[:_read] are committed (their text is final)
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._pending = ""  # text of ids[_read:] already made visible (before an incomplete tail; not committed)
        self._held = ""  # text produced but not handed out yet (a possible stop-string start)
        self._pieces: list[str] = []  # text handed out
        self.stopped = False
        self._final: str | None = None

    @property
    def text(self) -> str:
        """The final text after `finish()`; before it, the text handed out so far."""
        return self._final if self._final is not None else "".join(self._pieces)

    def add(self, token_id: int) -> str:
        if self._final is not None:
            raise RuntimeError("StreamingDetokenizer.add: called after finish(); make a new detokenizer")
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        new = self._decode(self.ids[self._prefix:])
        piece = new[len(self._prefix_text):] if len(new) > len(self._prefix_text) else ""
        commit = bool(piece) and not piece.endswith(REPLACEMENT)
        visible = piece if commit else piece.rstrip(REPLACEMENT)  # the text before an incomplete character
        extends = visible.startswith(self._pending)
        if extends:
            self._held += visible[len(self._pending):]
        # else the window's text changed under text already made visible (a decoder that is not stable when a
        # window grows): nothing more of this window is handed out, and `finish()` settles the final text
        if commit:  # a safe boundary: the chunk is final and becomes the next window's prefix
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
            self._pending = ""
        elif extends:
            self._pending = visible
        return self._release()

    def _release(self) -> str:
        """Hand out the held text up to the first stop string, or up to the longest tail that starts one."""
        held = self._held
        if not self.stop:
            self._held = ""
            return self._out(held)
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return self._out(held[:min(hits)])
        keep = 0
        for s in self.stop:  # the longest suffix of the held text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:k]):
                    keep = k
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return self._out(held[:len(held) - keep])

    def _out(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def finish(self) -> str:
        """The rest of the text (held-back and incomplete tails); the final text is `decode(ids)` up to a stop."""
        if self._final is not None:
            return ""
        full = self._decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            full = full[:min(hits)]
        sent = "".join(self._pieces)
        self._final = full
        self._held = ""
        return full[len(sent):] if full.startswith(sent) else ""  # a tokenizer that decodes windows differently
