"""Global page allocator with a prefix cache.

Pages are *global*: page g holds `page_size * dcp` token slots spread over the DCP group (kv/layout.py), and
the allocator lives in the scheduler only; ranks just receive block tables. A full page is identified by
the hash of its tokens chained to its predecessor's hash, i.e. by the whole prefix up to its end, so the
cache is a radix tree over pages stored as a hash map from path to page. A cached page stays valid while
unreferenced (refcount 0) until it is evicted, least recently used first, to satisfy an allocation. The
tokens of a cached page sit on their owner ranks in the same local rows, so a hit works for any DCP size:
the prefill path gathers them from the group.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


def page_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class PageAllocator:
    num_pages: int
    page_tokens: int  # global slots per page (page_size * dcp)
    enable_prefix_cache: bool = True
    free: list[int] = field(default_factory=list)
    refcount: list[int] = field(default_factory=list)
    hash_of: dict[int, int] = field(default_factory=dict)  # page -> hash (full, cached pages)
    page_of: dict[int, int] = field(default_factory=dict)  # hash -> page
    evictable: OrderedDict = field(default_factory=OrderedDict)  # cached pages with refcount 0, LRU first
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_pages - 1, -1, -1))
        self.refcount = [0] * self.num_pages

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"need {n} KV pages, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.page_of[self.hash_of.pop(page)]
            self.refcount[page] = 1
            out.append(page)
        return out

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refcount[page] -= 1
            assert self.refcount[page] >= 0, f"page {page} released twice"
            if self.refcount[page] == 0:
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    def match_prefix(self, tokens: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """Longest run of cached full pages covering at most `max_tokens` of `tokens`. Takes a reference on
        each matched page. Returns (pages, their hashes)."""
        pages, hashes = [], []
        if not self.enable_prefix_cache:
            return pages, hashes
        prev = None
        n = self.page_tokens
        for i in range(max_tokens // n):
            h = page_hash(prev, tuple(tokens[i * n : (i + 1) * n]))
            page = self.page_of.get(h)
            if page is None:
                break
            if self.refcount[page] == 0:
                self.evictable.pop(page, None)
            self.refcount[page] += 1
            pages.append(page)
            hashes.append(h)
            prev = h
        return pages, hashes

    def record_query(self, queried: int, hit: int) -> None:
        self.stats.queried_tokens += queried
        self.stats.hit_tokens += hit

    def register(self, page: int, prev_hash: int | None, tokens: tuple[int, ...]) -> int:
        """Mark a page that just became full as reusable; returns its hash."""
        h = page_hash(prev_hash, tokens)
        if self.enable_prefix_cache and h not in self.page_of and page not in self.hash_of:
            self.page_of[h] = page
            self.hash_of[page] = h
        return h
