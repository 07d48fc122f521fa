"""docs/BUNDLE.md and the code agree: its examples read with the schema modules, its message
table lists exactly the protocol's types and fields."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llc.bundle import schema
from llc.runtime.device import document, protocol

DOC = Path(__file__).resolve().parent.parent / "docs" / "BUNDLE.md"
TYPES = {"plan.json": schema.PlanDoc, "manifest.json": schema.Manifest, "coordinator.json": schema.CoordinatorDoc,
         "deploy.json": schema.DeployRecord}


def examples() -> dict[str, str]:
    text = DOC.read_text()
    return dict(re.findall(r"<!-- example: (\S+) -->\n```json\n(.*?)\n```", text, re.S))


@pytest.mark.parametrize("name", sorted(TYPES))
def test_doc_example_reads_with_the_schema(name):
    data = json.loads(examples()[name])
    doc = document.from_dict(TYPES[name], data, f"BUNDLE.md {name}")
    assert data["format"] == (schema.MANIFEST_FORMAT if name == "manifest.json" else schema.FORMAT)
    if hasattr(doc, "check"):
        doc.check(name)
    assert document.to_dict(doc).keys() >= data.keys()


def test_schema_refuses_what_the_doc_does_not_say():
    data = json.loads(examples()["manifest.json"])
    with pytest.raises(document.DocumentError, match="unknown key 'launcher'"):
        document.from_dict(schema.Manifest, {**data, "launcher": "launcher.py"}, "m")
    with pytest.raises(document.DocumentError, match="missing key 'bind'"):
        document.from_dict(schema.Manifest, {k: v for k, v in data.items() if k != "bind"}, "m")
    with pytest.raises(document.DocumentError, match="stage: expected int"):
        document.from_dict(schema.Manifest, {**data, "stage": "1"}, "m")


def test_doc_message_table_is_the_protocol():
    table = DOC.read_text().split("<!-- messages -->")[1]
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|", table, re.M)
    assert {t for t, _ in rows} == set(protocol.FIELDS)
    for kind, fields in rows:
        listed = {f.strip().rstrip("*"): f.strip().endswith("*") for f in fields.split(",") if f.strip()}
        assert listed == {k: required for k, (_, required) in protocol.FIELDS[kind].items()}, kind
