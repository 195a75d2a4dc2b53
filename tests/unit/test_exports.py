import json

import pandas as pd
from label_studio_sdk.label_interface import LabelInterface
from pycocotools.coco import COCO

from tasks.exports import label_studio_config, to_label_studio, write_exports

ROWS = pd.DataFrame(
    {
        "image": ["m-a/1.png", "m-a/2.png", "m-b/3.png"],
        "sha256": ["1", "2", "3"],
        "cluster": [0, 1, 1],
        "label": ["crack", "void & pit", "void & pit"],
        "confidence": [0.95, 0.4, 0.81],
        "needs_review": [False, True, False],
        "label_source": ["seed propagation", "seed propagation", "human-named cluster"],
    }
)
SIZES = {"m-a/1.png": (96, 96), "m-a/2.png": (96, 96), "m-b/3.png": (128, 64)}


def test_exports_load_in_their_tools(tmp_path):
    write_exports(tmp_path, ROWS, SIZES, model_version="models:/e/1")
    coco = COCO(str(tmp_path / "exports" / "coco.json"))
    assert len(coco.getImgIds()) == 3 and {c["name"] for c in coco.loadCats(coco.getCatIds())} == {
        "crack",
        "void & pit",
    }
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[3]))[0]
    assert ann["bbox"] == [0, 0, 128, 64] and coco.loadCats(ann["category_id"])[0]["name"] == "void & pit"

    interface = LabelInterface((tmp_path / "exports" / "label_studio_config.xml").read_text())
    tasks = json.loads((tmp_path / "exports" / "label_studio_tasks.json").read_text())
    assert len(tasks) == 3
    for task in tasks:
        assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []  # no errors
    assert [t["predictions"][0]["score"] for t in tasks] == [0.95, 0.4, 0.81]

    from xml.etree import ElementTree as ET

    root = ET.parse(tmp_path / "exports" / "cvat_annotations.xml").getroot()
    assert {lab.findtext("name") for lab in root.iter("label")} == {"crack", "void & pit"}
    assert [img.find("tag").get("label") for img in root.iter("image")] == list(ROWS["label"])


def test_label_studio_sdk_catches_a_bad_prediction():
    interface = LabelInterface(label_studio_config(ROWS))
    bad = to_label_studio(ROWS, "", "v")[0]["predictions"][0]
    bad["result"][0]["value"]["choices"] = ["not-a-label"]
    errors = interface.validate_prediction(bad, return_errors=True)
    assert errors and "not-a-label" in str(errors)
