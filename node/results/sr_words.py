"""An SR's content tree in words, one line per content item, for people (the web page's report).

Like DCMTK's ``dsrdump`` or ``dsr2html``, but plain pydicom (the web process
loads no highdicom): each item is "concept: value" with its value type read the
way a radiologist reads it (a code by its meaning, a number with its unit, an
image by its Instance Number when the result names it, a spatial coordinate by
its graphic type and points), indented by its depth in the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pydicom.dataset import Dataset

#: Items nested deeper than this are cut (a malformed or hostile SR cannot make the page endless).
MAX_DEPTH = 16
MAX_LINES = 2000


@dataclass(frozen=True)
class Line:
    depth: int
    concept: str
    value: str
    relationship: str = ""  # CONTAINS, HAS OBS CONTEXT, INFERRED FROM...

    @property
    def text(self) -> str:
        return f"{self.concept}: {self.value}" if self.value else self.concept


def sr_in_words(sr: Dataset, image_labels: Mapping[str, str] | None = None) -> list[Line]:
    """The content tree of ``sr``, depth first; ``image_labels``: SOP Instance UID -> how people name it."""
    labels = dict(image_labels or {})
    title = _meaning(sr.get("ConceptNameCodeSequence")) or "Structured report"
    flags = ", ".join(f"{what} {str(sr.get(key, '?')).lower()}" for what, key in
                      (("completion", "CompletionFlag"), ("verification", "VerificationFlag")))
    out = [Line(0, title, flags)]
    _walk(sr.get("ContentSequence", []), 1, labels, out)
    return out[:MAX_LINES]


def _walk(items: Iterable[Dataset], depth: int, labels: dict[str, str], out: list[Line]) -> None:
    if depth > MAX_DEPTH:
        out.append(Line(depth, "…", "nested deeper than this page shows"))
        return
    for item in items:
        if len(out) >= MAX_LINES:
            return
        out.append(Line(depth, _meaning(item.get("ConceptNameCodeSequence")) or "(unnamed)", _value(item, labels),
                        str(item.get("RelationshipType", ""))))
        _walk(item.get("ContentSequence", []), depth + 1, labels, out)


def _meaning(codes: Any) -> str:
    if not codes:
        return ""
    return str(codes[0].get("CodeMeaning", "") or codes[0].get("CodeValue", ""))


def _value(item: Dataset, labels: dict[str, str]) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return "(no value)"
        unit = measured[0].get("MeasurementUnitsCodeSequence")
        unit_text = str(unit[0].get("CodeValue", "")) if unit else ""
        if unit_text.startswith("{"):  # a UCUM annotation such as {pixels}: its meaning reads better
            unit_text = str(unit[0].get("CodeMeaning", unit_text))
        return f"{measured[0].get('NumericValue', '')} {'' if unit_text == '1' else unit_text}".strip()
    if kind in ("UIDREF",):
        return str(item.get("UID", ""))
    if kind in ("PNAME", "DATE", "TIME", "DATETIME"):
        return str(item.get({"PNAME": "PersonName", "DATE": "Date", "TIME": "Time", "DATETIME": "DateTime"}[kind], ""))
    if kind in ("IMAGE", "COMPOSITE"):
        refs = item.get("ReferencedSOPSequence")
        if not refs:
            return "(no reference)"
        uid = str(refs[0].get("ReferencedSOPInstanceUID", ""))
        return f"image {labels[uid]}" if uid in labels else f"object {uid}"
    if kind == "SCOORD":
        points = list(item.get("GraphicData", []))
        pairs = ", ".join(f"(column {points[i]:.0f}, row {points[i + 1]:.0f})" for i in range(0, min(len(points), 8), 2))
        return f"{str(item.get('GraphicType', '')).lower()} at {pairs}{' …' if len(points) > 8 else ''}"
    if kind == "SCOORD3D":
        points = list(item.get("GraphicData", []))
        triples = ", ".join(f"({points[i]:.1f}, {points[i + 1]:.1f}, {points[i + 2]:.1f}) mm"
                            for i in range(0, min(len(points), 9), 3))
        return f"{str(item.get('GraphicType', '')).lower()} at {triples} (patient coordinates)"
    if kind == "CONTAINER":
        return ""
    return f"({kind.lower() or 'no value type'})"
