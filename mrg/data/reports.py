"""OpenI (Indiana University) radiology reports: the XML files of ``NLMCXR_reports.tgz``."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mrg.text.cleaning import display_form


@dataclass
class OpenIReport:
    """One OpenI report: ``report_id`` is ``CXR<n>`` (the file ``ecgen-radiology/<n>.xml``)."""

    report_id: str
    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    image_ids: list[str] = field(default_factory=list)
    mesh_major: list[str] = field(default_factory=list)


def parse_openi_xml(data: bytes | str) -> OpenIReport:
    root = ET.fromstring(data)
    uid = root.find("uId")
    report = OpenIReport(report_id=uid.get("id") if uid is not None else "")
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").lower()
        if label in ("findings", "impression", "indication", "comparison"):
            setattr(report, label, display_form(node.text or ""))
    report.image_ids = [node.get("id") for node in root.iter("parentImage") if node.get("id")]
    report.mesh_major = [
        (node.text or "").strip() for node in root.iter("major") if (node.text or "").strip()
    ]
    return report


def iter_openi_reports(source: str | Path) -> Iterator[OpenIReport]:
    """Reports from ``NLMCXR_reports.tgz`` or from its extracted folder, in file-name order."""
    source = Path(source)
    if source.is_dir():
        for path in sorted(source.rglob("*.xml"), key=lambda p: _xml_number(p.name)):
            yield parse_openi_xml(path.read_bytes())
        return
    with tarfile.open(source) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")]
        for member in sorted(members, key=lambda m: _xml_number(Path(m.name).name)):
            yield parse_openi_xml(archive.extractfile(member).read())


def _xml_number(name: str) -> int:
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else 0
