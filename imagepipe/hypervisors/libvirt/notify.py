"""A message to the user of a libvirt desktop (the rollout's deadline warning), through the
guest agent: imagepipe's `imagepipe-notify` command, which the tiny guest's agent shows on
its console and screen (packer/tiny/guest/agent.c). Pure: builds the command text."""

from __future__ import annotations

import json

MAX_TEXT = 900  # the agent keeps 1 KiB per message


def plain_text(text: str) -> str:
    """The message as the agent takes it: one line of printable text, no quotes or
    backslashes (the agent reads JSON strings without escapes)."""
    out = []
    for char in " ".join(text.split()):
        if char == '"':
            out.append("'")
        elif char == "\\":
            out.append("/")
        elif char.isprintable():
            out.append(char)
    return "".join(out)[:MAX_TEXT]


def notify_command(text: str) -> str:
    """The guest agent command that shows `text` to the desktop's user."""
    return json.dumps({"execute": "imagepipe-notify", "arguments": {"text": plain_text(text)}})
