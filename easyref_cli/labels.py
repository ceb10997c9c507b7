"""The machine-readable "AI-generated" label every image carries: an XMP packet (PNG iTXt chunk
``XML:com.adobe.xmp``) with IPTC ``DigitalSourceType = trainedAlgorithmicMedia`` and the generator,
as exiftool and the photo platforms read it. Standard library only; torch-free.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import quoteattr

#: The PNG text chunk XMP lives in (Adobe XMP Specification Part 3, PNG).
XMP_CHUNK = "XML:com.adobe.xmp"
#: IPTC NewsCodes digital source type of media made by a trained generative model.
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
}


def xmp_packet(generator: str) -> str:
    """An XMP packet saying the image is ``trainedAlgorithmicMedia`` made by ``generator``."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{_NS["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{_NS["rdf"]}">\n'
        '  <rdf:Description rdf:about=""\n'
        f'    xmlns:Iptc4xmpExt="{_NS["Iptc4xmpExt"]}"\n'
        f'    xmlns:xmp="{_NS["xmp"]}"\n'
        f"    Iptc4xmpExt:DigitalSourceType={quoteattr(TRAINED_ALGORITHMIC_MEDIA)}\n"
        f"    xmp:CreatorTool={quoteattr(generator)}/>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def parse_xmp(text: str | bytes) -> dict[str, Any]:
    """``{"digital_source_type": ..., "creator_tool": ...}`` from an XMP packet (attribute or element
    form); empty when it says neither. Raises ``ValueError`` for a packet that is not XML."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    try:
        root = ET.fromstring(text[start : end + len("</x:xmpmeta>")] if start >= 0 and end > start else text)
    except ET.ParseError as e:
        raise ValueError(f"not an XMP packet: {e}") from None
    out: dict[str, Any] = {}
    wanted = {
        f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType": "digital_source_type",
        f"{{{_NS['xmp']}}}CreatorTool": "creator_tool",
    }
    for node in root.iter():
        for attribute, key in wanted.items():
            if attribute in node.attrib:
                out[key] = node.attrib[attribute]
        if node.tag in wanted and (node.text or "").strip():
            out[wanted[node.tag]] = node.text.strip()
    return out
