"""Hostile values the tests throw at every parser, field and the OAuth callback, and the tally the
test command prints ("hostile inputs tried: ...")."""

import json
import os

HOSTILE_TEXT = [
    "",
    " ",
    "x" * 1_048_576,  # 1 MB
    "alice@contoso.com\r\nBcc: everyone@contoso.com",
    "alice@contoso.com\nX-Injected: 1",
    "\x00\x01\x02",
    "'; DROP TABLE microsoft365_account; --",
    '" OR 1=1 --',
    "<script>alert(document.cookie)</script>",
    "<img src=x onerror=alert(1)>",
    "{{7*7}}${7*7}%(x)s%s",
    "../../../../etc/passwd",
    "https://evil.example/callback",
    "javascript:alert(1)",
    "Ünïcödé ✉ 📧 \u202e\u200b",
    "\uffff",
    "a" * 300 + "@" + "b" * 300 + ".com",
    "0" * 36,
    "{00000000-0000-0000-0000-000000000000",
]


def record_hostile_inputs(kind, count):
    """Adds `count` inputs of `kind` to the run's tally (only when the test command asks for it)."""
    folder = os.environ.get("M365_REPORT_DIR")
    if folder:
        with open(os.path.join(folder, "hostile_inputs.jsonl"), "a") as handle:
            handle.write(json.dumps({"kind": kind, "count": count}) + "\n")
