import csv
import hashlib
from pathlib import Path

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
    localize_folder,
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


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def pair_tree(tmp_path) -> tuple[Path, Path, list[Box]]:
    """images/ and golden/ (rule same-name): two pairs with planted defects in a sub-folder, a defect-free pair,
    an image without a template and a corrupt image that has one."""
    images, golden = tmp_path / "images", tmp_path / "golden"
    test, template, planted = _pair()
    clean, clean_template, _ = _pair(defects=False)
    files = {
        "line1/a.png": (test, template),
        "line1/b.png": (np.fliplr(test), np.fliplr(template)),
        "clean.png": (clean, clean_template),
    }
    for rel, (t, g) in files.items():
        for root, img in ((images, t), (golden, g)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img)).save(root / rel)
    Image.fromarray(test).save(images / "lonely.png")  # no template
    (images / "broken.png").write_bytes((images / "clean.png").read_bytes()[:200])  # truncated, has a template
    Image.fromarray(template).save(golden / "broken.png")
    (images / "notes.txt").write_text("not an image")
    return images, golden, planted


def test_localize_folder_patches_boxes_and_accounting(pair_tree, tmp_path):
    images, golden, planted = pair_tree
    out = tmp_path / "patches"
    result = localize_folder(images, golden, out, LocalizeParams())
    assert (result.images, result.pairs, result.unpaired, result.localized, result.no_defect) == (5, 4, 1, 2, 1)
    assert result.patches == 2 * len(planted) and result.whole == 2 and result.skipped == 0
    assert [f[0] for f in result.failures] == ["broken.png"] and "truncated" in result.failures[0][1]
    boxes = _rows(out / "boxes.csv")
    defects = [r for r in boxes if r["kind"] == "defect"]
    assert len(defects) == result.patches
    # every planted defect of a.png is inside one of its crops, and every patch is exactly its crop of the image
    crops_a = [
        Box(*(int(r[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")))
        for r in defects
        if r["image"] == "line1/a.png"
    ]
    for box in planted:
        assert any(_covers(c, box) for c in crops_a), box
    source = np.asarray(Image.open(images / "line1/a.png"))
    for r in defects:
        assert r["patch"].startswith(r["image"] + "__") and r["template"] == r["image"]
        assert r["template_sha256"] == hashlib.sha256((golden / r["template"]).read_bytes()).hexdigest()
        assert r["image_sha256"] == hashlib.sha256((images / r["image"]).read_bytes()).hexdigest()
        x0, y0, x1, y1 = (int(r[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))
        assert r["patch"].endswith(f"_{x0}_{y0}.png")
        if r["image"] == "line1/a.png":
            assert np.array_equal(np.asarray(Image.open(out / r["patch"])), source[y0:y1, x0:x1])
    # the patch folder holds exactly the rows of boxes.csv (plus the two tables)
    assert set(_snapshot(out)) == {r["patch"] for r in boxes} | {"boxes.csv", "unlocalized.csv"}
    others = {r["image"]: r for r in _rows(out / "unlocalized.csv")}
    assert set(others) == {"clean.png", "lonely.png", "broken.png"}
    assert others["clean.png"]["action"] == "no-defect"
    assert others["lonely.png"]["action"] == "passthrough" and others["lonely.png"]["reason"] == "no template"
    assert others["broken.png"]["action"] == "passthrough" and "undecodable" in others["broken.png"]["reason"]
    # whole images are copied unchanged: the validate step judges (and quarantines) them as in any run
    for rel in ("lonely.png", "broken.png"):
        assert (out / rel).read_bytes() == (images / rel).read_bytes()
    counts = result.as_dict()
    assert counts["n_failures"] == 1 and counts["failure_reasons"] == {"undecodable image": 1}
    assert counts["n_ignored"] == 1


def test_localize_folder_is_deterministic_and_clears_stale_patches(pair_tree, tmp_path):
    images, golden, _ = pair_tree
    params = LocalizeParams()
    localize_folder(images, golden, tmp_path / "one", params)
    localize_folder(images, golden, tmp_path / "two", params)
    first = _snapshot(tmp_path / "one")
    assert first == _snapshot(tmp_path / "two")  # same names, same bytes
    mtimes = {rel: (tmp_path / "one" / rel).stat().st_mtime_ns for rel in first}
    (tmp_path / "one" / "line1" / "old__0_0_0.png").write_bytes(b"stale")
    (tmp_path / "one" / "gone").mkdir()
    (tmp_path / "one" / "gone" / "x.png").write_bytes(b"stale")
    localize_folder(images, golden, tmp_path / "one", params)
    assert _snapshot(tmp_path / "one") == first and not (tmp_path / "one" / "gone").exists()
    assert {rel: (tmp_path / "one" / rel).stat().st_mtime_ns for rel in first} == mtimes  # unchanged: not rewritten


def test_localize_folder_skip_unpaired(pair_tree, tmp_path):
    images, golden, _ = pair_tree
    out = tmp_path / "patches"
    result = localize_folder(images, golden, out, LocalizeParams(unpaired="skip"))
    assert result.skipped == 1 and result.whole == 1  # the corrupt image still goes on to the validate quarantine
    assert not (out / "lonely.png").exists() and (out / "broken.png").exists()
    others = {r["image"]: r["action"] for r in _rows(out / "unlocalized.csv")}
    assert others["lonely.png"] == "skipped"


def test_localize_folder_single_golden_and_templates_excluded(pair_tree, tmp_path):
    images, golden, _ = pair_tree
    (images / "golden.png").write_bytes((golden / "line1" / "a.png").read_bytes())
    result = localize_folder(images, images / "golden.png", tmp_path / "p", LocalizeParams(rule="single"))
    assert result.templates_excluded == 1 and result.pairs == 5  # every other image, against the one golden image
    assert result.unpaired == 0 and result.whole == 1  # only the corrupt image goes through whole
    assert result.localized >= 2  # a.png and lonely.png (the same defects) at least
    assert {r["image"]: r["action"] for r in _rows(tmp_path / "p" / "unlocalized.csv")}["golden.png"] == "template"


def test_localize_folder_refuses_overlapping_or_foreign_output(pair_tree, tmp_path):
    images, golden, _ = pair_tree
    with pytest.raises(ValueError, match="overlap"):
        localize_folder(images, golden, images / "patches", LocalizeParams())
    with pytest.raises(ValueError, match="overlap"):
        localize_folder(images, golden, golden, LocalizeParams())
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a patch folder"):
        localize_folder(images, golden, foreign, LocalizeParams())
    assert (foreign / "keep.txt").exists()
    with pytest.raises(ValueError, match="rule single"):
        localize_folder(images, golden / "missing.png", tmp_path / "p", LocalizeParams(rule="same-name"))


@pytest.mark.data
def test_real_pairs_through_localize_folder(shared_data, tmp_path):
    """Three DeepPCB pairs side by side (rule suffix): the crops in boxes.csv find the annotated defects."""
    import shutil

    data = shared_data / "deeppcb-pairs"
    truth: dict[str, list[Box]] = {}
    for row in _rows(data / "boxes.csv"):
        truth.setdefault(row["image"], []).append(Box(int(row["x1"]), int(row["y1"]), int(row["x2"]), int(row["y2"])))
    raw = tmp_path / "raw"
    raw.mkdir()
    chosen = sorted(truth)[::150][:3]
    for image in chosen:
        shutil.copy(data / image, raw)
        shutil.copy(data / image.replace("_test", "_temp"), raw)
    result = localize_folder(raw, raw, tmp_path / "patches", LocalizeParams(rule="suffix"))
    assert result.pairs == 3 and result.templates_excluded == 3 and not result.failures
    crops: dict[str, list[Box]] = {}
    for r in _rows(tmp_path / "patches" / "boxes.csv"):
        crops.setdefault(r["image"], []).append(Box(*(int(r[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))))
    found = total = 0
    for image in chosen:
        for gt in truth[image]:
            cx, cy = (gt.x1 + gt.x2) / 2, (gt.y1 + gt.y2) / 2
            total += 1
            found += any(c.x1 <= cx < c.x2 and c.y1 <= cy < c.y2 for c in crops.get(Path(image).name, []))
    assert total >= 9 and found / total >= 0.9
