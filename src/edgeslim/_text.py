"""Text from elsewhere (nodes, a controller, a file name), made safe to show on a terminal."""

from __future__ import annotations


def visible(text: str, *, keep: str = "") -> str:
    """``text`` with every character that does not print (ESC, BEL, CR, DEL, the C1 controls,
    bidirectional overrides, zero-width marks, line separators) written as its escape
    (``\\x1b``, ``\\u202e``), except those in ``keep`` (say ``"\\n"``).

    Such characters in a node's label or an error message could otherwise move the cursor,
    clear the screen, set the window title or plant a hyperlink (OSC 8) on the operator's
    terminal, or hide what a line says; escaped, they show that the text was tampered with.

    >>> visible("ok\\x1b]0;pwned\\x07")
    'ok\\\\x1b]0;pwned\\\\x07'
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch in keep:
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)
