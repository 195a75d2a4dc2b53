"""Exports of a label set for labelling tools: COCO, Label Studio pre-annotations, CVAT for images 1.1.

Each image is a whole defect patch, so labels are image-level: COCO gets one full-image box per image (the form
CVAT and most detectors import), Label Studio gets ``choices`` predictions with a ``score`` so reviewers can sort
by it, and CVAT gets image ``tag`` elements.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import pandas as pd

LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single" showInline="true">
{choices}
  </Choices>
</View>"""


def _categories(rows: pd.DataFrame) -> list[str]:
    return sorted(rows["label"].astype(str).unique())


def to_coco(rows: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> dict:
    """COCO detection JSON with one full-image box per image; ``score`` and ``needs_review`` kept as extras."""
    cats = _categories(rows)
    cat_id = {c: i + 1 for i, c in enumerate(cats)}
    images, annotations = [], []
    for i, row in enumerate(rows.itertuples(index=False), start=1):
        w, h = sizes[row.image]
        images.append({"id": i, "file_name": row.image, "width": int(w), "height": int(h)})
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": cat_id[str(row.label)],
                "bbox": [0, 0, int(w), int(h)],
                "area": int(w) * int(h),
                "iscrowd": 0,
                "score": float(row.confidence),
                "attributes": {"needs_review": bool(row.needs_review), "label_source": row.label_source},
            }
        )
    return {
        "info": {"description": "aoi-autolabel label set"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": "defect"} for c in cats],
    }


def label_studio_config(rows: pd.DataFrame) -> str:
    choices = "\n".join(f'    <Choice value="{_xml_attr(c)}"/>' for c in _categories(rows))
    return LABEL_STUDIO_CONFIG.format(choices=choices)


def _xml_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def to_label_studio(rows: pd.DataFrame, image_url_prefix: str, model_version: str) -> list[dict]:
    """Label Studio tasks, each with one prediction (the label) and its ``score``."""
    tasks = []
    for row in rows.itertuples(index=False):
        tasks.append(
            {
                "data": {"image": f"{image_url_prefix}{row.image}", "path": row.image},
                "predictions": [
                    {
                        "model_version": model_version,
                        "score": float(row.confidence),
                        "result": [
                            {
                                "from_name": "label",
                                "to_name": "image",
                                "type": "choices",
                                "value": {"choices": [str(row.label)]},
                                "score": float(row.confidence),
                            }
                        ],
                    }
                ],
                "meta": {"needs_review": bool(row.needs_review), "label_source": row.label_source},
            }
        )
    return tasks


def to_cvat(rows: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> bytes:
    """CVAT for images 1.1 XML: the labels in ``meta`` and one ``tag`` per image."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(meta, "size").text = str(len(rows))
    labels = ET.SubElement(meta, "labels")
    for c in _categories(rows):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = c
        ET.SubElement(label, "type").text = "tag"
    for i, row in enumerate(rows.itertuples(index=False)):
        w, h = sizes[row.image]
        image = ET.SubElement(root, "image", id=str(i), name=row.image, width=str(w), height=str(h))
        ET.SubElement(image, "tag", label=str(row.label), source="auto")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_exports(folder: Path, rows: pd.DataFrame, sizes: dict[str, tuple[int, int]], model_version: str) -> None:
    """Write ``exports/`` into a label set folder."""
    out = folder / "exports"
    out.mkdir()
    (out / "coco.json").write_text(json.dumps(to_coco(rows, sizes), indent=1))
    (out / "label_studio_tasks.json").write_text(
        json.dumps(to_label_studio(rows, "/data/local-files/?d=", model_version), indent=1)
    )
    (out / "label_studio_config.xml").write_text(label_studio_config(rows))
    (out / "cvat_annotations.xml").write_bytes(to_cvat(rows, sizes))
