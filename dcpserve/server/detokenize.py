"""Incremental detokenization and server-side stop strings.

Streaming text token by token must never emit half a UTF-8 character: byte-level BPE splits a multi-byte
character over several tokens, and decoding a prefix of them yields U+FFFD. The detokenizer keeps a small
window of tokens (prefix_offset..read_offset, the scheme vLLM and TGI use) and only emits text once the
window decodes to something that does not end in U+FFFD.

Stop strings are matched on the detokenized text. While a stop string could still be forming, the last
`max(len(stop)) - 1` characters are held back, so the stream never shows part of a stop string that later
gets cut.
"""
from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that became final."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix_text) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The request ended: emit whatever is pending, even an incomplete character."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix_text):] if len(full) > len(prefix_text) else ""


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token that ended the request


@dataclass
class OutputProcessor:
    """Turns engine token events into text deltas for one request; applies stop strings."""

    tokenizer: object | None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _sent: int = 0

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, self.skip_special_tokens) if self.tokenizer else None
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def emitted_text(self) -> str:
        """The text handed out so far (less than `text` while characters are held back)."""
        return self.text[: self._sent]

    def process(self, new_ids: list[int], finished: bool, reason: str | None) -> Delta:
        self.token_ids.extend(new_ids)
        text_ids = new_ids
        if finished and reason == "stop" and new_ids:
            # EOS / stop token ended the request: its text is not part of the output (OpenAI semantics).
            text_ids = new_ids[:-1]
            last = new_ids[-1]
            self.stop_reason = last if last in self.stop_token_ids else None
        new_text = ""
        if self._detok is not None:
            new_text = self._detok.add(text_ids)
            if finished:
                new_text += self._detok.flush()
        before = len(self.text)
        self.text += new_text
        if self.stop and self._match_stop(before):
            finished, reason = True, "stop"
        if finished:
            self.finished, self.finish_reason = True, reason
            upto = len(self.text)
        else:
            upto = max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:upto]
        self._sent = upto
        return Delta(out, list(new_ids), finished, reason, self.stop_reason if finished else None)

    def _match_stop(self, before: int) -> bool:
        # A new match must end in the new text, so it starts at most `hold` characters before it.
        start = max(0, before - self._hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop else i]
        self.stop_reason = s
        return True
