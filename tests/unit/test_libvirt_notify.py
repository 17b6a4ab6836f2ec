"""The guest agent command that carries a deadline warning into a libvirt desktop."""

from __future__ import annotations

import json

from imagepipe.hypervisors.libvirt.notify import MAX_TEXT, notify_command


def test_the_command_carries_the_message_as_one_plain_line() -> None:
    command = json.loads(notify_command('Save your "work"\\nnow\n\tplease'))
    assert command == {
        "execute": "imagepipe-notify",
        "arguments": {"text": "Save your 'work'/nnow please"},
    }
    assert "\\\\" not in notify_command("a\\b") and '\\"' not in notify_command('a"b')


def test_a_long_message_is_cut_to_what_the_agent_keeps() -> None:
    text = json.loads(notify_command("x" * 5000))["arguments"]["text"]
    assert len(text) == MAX_TEXT
