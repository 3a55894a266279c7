"""The responses /v1/responses keeps (OpenAI's `store`), for `previous_response_id` and GET / DELETE
/v1/responses/{id}: in the HTTP process's memory, the most recent --responses-store-size of them (least recently
used first out), lost at a restart. A response is kept as its conversation in input items (the earlier ones, the
request's input and its output items), so a follow-up renders it through the same translation as any input."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    items: list[dict[str, Any]]  # the conversation up to and with this response's output, as input items
    response: dict[str, Any]  # the response object as answered


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, rid: str, stored: StoredResponse) -> None:
        if self.capacity < 1:
            return
        self._kept[rid] = stored
        self._kept.move_to_end(rid)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, rid: str) -> StoredResponse | None:
        stored = self._kept.get(rid)
        if stored is not None:
            self._kept.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> bool:
        return self._kept.pop(rid, None) is not None
