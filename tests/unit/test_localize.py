import csv

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from tasks.localize import (
    Box,
    LocalizeParams,
    crop_box,
    crop_boxes,
    find_defects,
    localize_file,
    pair_templates,
    register,
)

SHIFT = (1, -2)  # test[y, x] shows template[y + 1, x - 2]


def _scene(size: int = 200) -> np.ndarray:
    """A grey 'golden' board: graded background, pads and tracks of several grey levels, mild noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 60.0 + 0.15 * xx  # uneven illumination
    for i in range(6):
        y0 = 12 + 30 * i
        img[y0 : y0 + 8, 10 : size - 10] = 190 + 8 * i  # tracks
    for cy, cx in [(40, 60), (100, 150), (160, 80)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 230  # pads
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255)


def _pair(defects: bool = True) -> tuple[np.ndarray, np.ndarray, list[Box]]:
    """Template and a shifted, darker test with three planted defects (their boxes in test coordinates)."""
    big = _scene(220)
    template = big[10:210, 10:210]
    dy, dx = SHIFT
    test = big[10 + dy : 210 + dy, 10 + dx : 210 + dx].copy()
    planted: list[Box] = []
    if defects:
        # in test coordinates tracks cover rows 1-9, 31-39, 61-69, ...; a pad is centred at (89, 142)
        test[105:113, 30:38] = 235  # spurious copper on the background
        planted.append(Box(30, 105, 38, 113))
        test[60:71, 100:103] = 70  # a 3 px wide cut across a track ("open")
        planted.append(Box(100, 60, 103, 71))
        test[86:92, 139:145] = 30  # a pin-hole in a pad
        planted.append(Box(139, 86, 145, 92))
    test = test * 0.8 + 25  # the test camera has lower gain and a higher offset
    rng = np.random.default_rng(1)
    test = np.clip(test + rng.normal(0, 2, test.shape), 0, 255)
    return test.astype(np.uint8), template.astype(np.uint8), planted


def _covers(crop: Box, box: Box) -> bool:
    return crop.x1 <= box.x1 and crop.y1 <= box.y1 and crop.x2 >= box.x2 and crop.y2 >= box.y2


def _overlaps(a: Box, b: Box) -> bool:
    return a.x1 < b.x2 and b.x1 < a.x2 and a.y1 < b.y2 and b.y1 < a.y2


def test_register_recovers_shift_despite_lighting():
    test, template, _ = _pair()
    assert register(test, template, max_shift=4) == SHIFT
    assert register(test, template, max_shift=4, method="phase") == SHIFT


def test_planted_defects_found_and_cropped():
    test, template, planted = _pair()
    params = LocalizeParams()
    boxes = find_defects(test, template, params)
    crops = crop_boxes(test, boxes, params)
    assert len(boxes) == len(planted)  # nothing spurious from the shift, the gain change or the noise
    for box in planted:
        assert any(_covers(c, box) for c, _ in crops), box
    for c, patch in crops:
        assert c.width == c.height == params.min_side and patch.shape == (c.height, c.width)
        assert 0 <= c.x1 and c.x2 <= test.shape[1] and 0 <= c.y1 and c.y2 <= test.shape[0]


def test_hairline_cracks_need_morph_radius_zero():
    test, template, _ = _pair()
    test[30:41, 120:121] = test[25, 120]  # a 1 px cut across the track at rows 31-39: thinner than the opening
    hairline = Box(120, 31, 121, 39)
    assert not any(_overlaps(b, hairline) for b in find_defects(test, template, LocalizeParams()))
    assert any(_overlaps(b, hairline) for b in find_defects(test, template, LocalizeParams(morph_radius=0)))


def test_defect_free_pairs_give_no_crops():
    _, template, _ = _pair()
    assert find_defects(template, template.copy(), LocalizeParams()) == []
    test, template, _ = _pair(defects=False)  # shifted, re-lit, noisy, but defect-free
    assert find_defects(test, template, LocalizeParams()) == []


def test_crop_rule_and_image_border():
    params = LocalizeParams(min_side=64, margin=16)
    assert crop_box(Box(0, 0, 10, 10), (200, 300), params) == Box(0, 0, 64, 64)
    big = crop_box(Box(250, 150, 300, 200), (200, 300), params)  # 50 px box in the corner: side 66, pushed inside
    assert (big.width, big.height, big.x2, big.y2) == (66, 66, 300, 200)
    assert crop_box(Box(0, 0, 10, 10), (40, 50), params).width == 40  # never larger than the image


def test_params_are_validated():
    with pytest.raises(ValidationError):
        LocalizeParams(threshold=0)
    with pytest.raises(ValidationError):
        LocalizeParams(unknown=1)
    with pytest.raises(ValidationError):
        LocalizeParams(test_suffix="_a", template_suffix="_a")
    with pytest.raises(ValidationError):
        LocalizeParams(percentiles=(99.0, 1.0))


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def test_pair_same_name(tmp_path):
    images, templates = tmp_path / "images", tmp_path / "golden"
    for rel in ["a/1.png", "a/2.png", "b/3.png"]:
        _touch(images / rel)
    for rel in ["a/1.png", "b/3.png"]:
        _touch(templates / rel)
    result = pair_templates(["a/1.png", "a/2.png", "b/3.png"], templates, images, "same-name")
    assert result.pairs == {"a/1.png": str(templates / "a/1.png"), "b/3.png": str(templates / "b/3.png")}
    assert result.missing == ["a/2.png"] and result.templates == []
    with pytest.raises(ValueError):
        pair_templates(["a/1.png"], None, images, "same-name")


def test_pair_same_name_templates_inside_image_tree(tmp_path):
    _touch(tmp_path / "x.png")
    _touch(tmp_path / "golden" / "x.png")
    result = pair_templates(["golden/x.png", "x.png"], tmp_path / "golden", tmp_path, "same-name")
    assert result.pairs == {"x.png": str(tmp_path / "golden" / "x.png")} and result.templates == ["golden/x.png"]
    with pytest.raises(ValueError):
        pair_templates(["x.png"], tmp_path, tmp_path, "same-name")  # every image would be its own template


def test_pair_suffix_excludes_templates(tmp_path):
    for rel in ["l1/01_test.jpg", "l1/01_temp.jpg", "l1/02_test.jpg", "l2/03_test.png", "l2/03_temp.png", "x.png"]:
        _touch(tmp_path / rel)
    listed = ["l1/01_temp.jpg", "l1/01_test.jpg", "l1/02_test.jpg", "l2/03_temp.png", "l2/03_test.png", "x.png"]
    result = pair_templates(listed, None, tmp_path, "suffix")
    assert result.pairs == {
        "l1/01_test.jpg": str(tmp_path / "l1/01_temp.jpg"),
        "l2/03_test.png": str(tmp_path / "l2/03_temp.png"),
    }
    assert result.templates == ["l1/01_temp.jpg", "l2/03_temp.png"]  # never labelled as inspected images
    assert result.missing == ["l1/02_test.jpg", "x.png"]  # no template file; no suffix at all
    custom = pair_templates(["p-insp.png"], None, tmp_path, "suffix", "-insp", "-ref")
    assert custom.missing == ["p-insp.png"]
    _touch(tmp_path / "p-ref.png")
    custom = pair_templates(["p-insp.png", "p-ref.png"], None, tmp_path, "suffix", "-insp", "-ref")
    assert custom.pairs == {"p-insp.png": str(tmp_path / "p-ref.png")} and custom.templates == ["p-ref.png"]


def test_pair_single_golden(tmp_path):
    for rel in ["a.png", "b.png", "golden.png"]:
        _touch(tmp_path / rel)
    result = pair_templates(["a.png", "b.png", "golden.png"], tmp_path / "golden.png", tmp_path, "single")
    assert result.pairs == {"a.png": str(tmp_path / "golden.png"), "b.png": str(tmp_path / "golden.png")}
    assert result.templates == ["golden.png"] and result.missing == []
    with pytest.raises(ValueError):
        pair_templates(["a.png"], tmp_path, tmp_path, "single")  # a folder is not a golden image
    with pytest.raises(ValueError):
        pair_templates(["a.png"], tmp_path, tmp_path, "nearest")


@pytest.mark.data
def test_real_pairs_recall(shared_data):
    data = shared_data / "deeppcb-pairs"
    if not (data / "boxes.csv").is_file():
        pytest.fail(f"{data}/boxes.csv missing")
    by_image: dict[str, list[Box]] = {}
    with (data / "boxes.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            by_image.setdefault(row["image"], []).append(
                Box(int(row["x1"]), int(row["y1"]), int(row["x2"]), int(row["y2"]))
            )
    found = total = 0
    for image in sorted(by_image)[::100][:5]:  # 5 pairs spread over the board families
        results = localize_file(data / image, data / image.replace("_test", "_temp"), LocalizeParams())
        for gt in by_image[image]:
            cx, cy = (gt.x1 + gt.x2) / 2, (gt.y1 + gt.y2) / 2
            total += 1
            found += any(c.x1 <= cx < c.x2 and c.y1 <= cy < c.y2 for _, c, _ in results)
    assert total >= 15 and found / total >= 0.9
