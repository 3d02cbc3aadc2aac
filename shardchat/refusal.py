"""A refusal of bad input, and the text rule every input check shares.

Every check of what a client sent returns None or a ``Refusal``: the SPEC error code and a
sentence a person can act on. It sits below the node and the internal API contract
(``internal_api.py``) because both refuse input the same way: the node's event checks
(``node/limits.py``) and the room request that the public API and the internal create call
read alike. It imports nothing of shardchat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# What SPEC section 4 refuses in text: control characters (Unicode category Cc: C0, DEL and
# C1) and lone surrogates, which JSON's \uD800 escapes can smuggle in but no UTF-8 encoder,
# browser or database takes. Format characters (the zero-width joiner of emoji sequences)
# are fine. One regex pass: ~1 us for a chat line, ~30 us for 4000 characters.
_BAD_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # \t, \n allowed
_BAD_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str

    def ack(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message}

    def connect_error(self) -> dict[str, Any]:
        return {"message": self.message, "data": {"code": self.code}}


def check_text(value: str, what: str, *, multiline: bool = False) -> Refusal | None:
    """``bad_request`` when ``value`` is not valid Unicode or holds a control character.

    ``what`` names the field in the sentence ("The message"). ``multiline`` text (messages)
    may hold newlines and tabs; names and ids are one line and may not."""
    found = (_BAD_IN_TEXT if multiline else _BAD_IN_LINE).search(value)
    if found is None:
        return None
    code_point = ord(found.group())
    if 0xD800 <= code_point <= 0xDFFF:
        return Refusal("bad_request", f"{what} is not valid Unicode text: it holds a lone "
                       f"surrogate (U+{code_point:04X}); send whole characters.")
    allowed = " (newlines and tabs are fine)" if multiline else ""
    return Refusal("bad_request", f"{what} holds the control character U+{code_point:04X}; "
                   f"remove it{allowed}.")
