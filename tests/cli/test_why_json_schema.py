"""docs/json.md documents exactly the fields `rebind why --json` emits (schema rebind.why/2)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

DOC = (Path(__file__).resolve().parents[2] / "docs" / "json.md").read_text()


def fields(section: str) -> set[str]:
    m = re.search(rf"^#+ {re.escape(section)}\n(.*?)(?=^#|\Z)", DOC, re.S | re.M)
    assert m, section
    return set(re.findall(r"^\| `(\w+)` \|", m.group(1), re.M))


def test_why_json_matches_the_doc(netns, rebind_cli):
    srv = socket.create_server(("127.0.0.1", 18120))
    res = rebind_cli("why", "18120", "--json")
    srv.close()
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert doc["schema"] == "rebind.why/2"
    assert set(doc) == fields("why: top level")
    assert set(doc["request"]) == fields("why request")
    assert set(doc["blockers"][0]) == fields("why blocker")
    assert set(doc["attempts"][0]) == fields("why attempt")
    assert set(doc["fixes"][0]) == fields("why fix")
