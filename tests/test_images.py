"""Image sources and safe decoding (vlkd.data.images)."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlkd.common.regionset import file_digest
from vlkd.data.images import (ImageDecodeError, ImageSourceError, decode_image_bytes,
                              open_image_source, read_image)


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h grey pixels (a few hundred bytes on disk)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + \
        _chunk(b"IEND", b"")


# ------------------------------------------------------------------------------- sources

def _touch_png(path, hw=(4, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(hw + (3,), np.uint8)).save(path)


def test_folder_source_recursive_sorted_ids(tmp_path):
    # Listing a folder decodes nothing: the content of the files does not matter here.
    for rel in ["b.png", "a/z.jpg", "a/c.PNG", "notes.txt", "a/deep/x.webp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    src = open_image_source(tmp_path)
    assert src.kind == "folder"
    assert [r.image_id for r in src] == ["a/c", "a/deep/x", "a/z", "b"]
    assert src.records[0].path == str(tmp_path / "a" / "c.PNG")
    info = src.manifest_info()
    assert info["num_images"] == 4 and info["kind"] == "folder"


def test_folder_source_duplicate_ids_refused(tmp_path):
    _touch_png(tmp_path / "x.png")
    (tmp_path / "x.jpg").write_bytes(b"x")
    with pytest.raises(ImageSourceError, match="more than once.*'x'"):
        open_image_source(tmp_path)


def test_list_source_paths_ids_comments_and_root(tmp_path):
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\nimgs/one.png\n\nimgs/two.png\tcustom-id\n/abs/three.jpg\n")
    src = open_image_source(lst)
    assert src.kind == "list"
    got = {r.image_id: r.path for r in src}
    assert got == {"imgs/one": str(tmp_path / "lists" / "imgs" / "one.png"),
                   "custom-id": str(tmp_path / "lists" / "imgs" / "two.png"),
                   "/abs/three": "/abs/three.jpg"}
    assert [r.image_id for r in src] == sorted(got)
    src2 = open_image_source(lst, image_root=tmp_path / "elsewhere")
    assert dict((r.image_id, r.path) for r in src2)["imgs/one"] == str(
        tmp_path / "elsewhere" / "imgs" / "one.png")
    # Same ids, other root: the id list digest (what a set compares) is unchanged.
    assert src.ids_digest() == src2.ids_digest()
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png\tid\textra\n")
    with pytest.raises(ImageSourceError, match=r"bad.txt:1: expected 'path' or"):
        open_image_source(bad)


def test_coco_and_karpathy_json(tmp_path):
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
        "annotations": []}))
    src = open_image_source(coco, image_root=tmp_path / "val2014")
    assert src.kind == "coco"
    assert [(r.image_id, r.path) for r in src] == [
        ("42", str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")),
        ("7", str(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg"))]  # string order
    with pytest.raises(ImageSourceError, match="--image-root"):
        open_image_source(coco)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "sentences": [], "cocoid": 391895},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 1,
         "split": "train", "sentences": [], "cocoid": 9}]}))
    src = open_image_source(karpathy, image_root=tmp_path)
    assert src.kind == "karpathy"
    assert [(r.image_id, r.path) for r in src] == [
        ("391895", str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")),
        ("9", str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg"))]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"url": "x"}]}))
    with pytest.raises(ImageSourceError, match="expected COCO"):
        open_image_source(other)


def test_missing_source(tmp_path):
    with pytest.raises(ImageSourceError, match="no such folder or file"):
        open_image_source(tmp_path / "nope")


# ------------------------------------------------------------------------------ decoding

@pytest.fixture
def bad_files(tmp_path):
    """One file (or non-file) per failure kind, and the kind it must be reported as."""
    rs = np.random.RandomState(0)
    rgb = rs.randint(0, 256, (64, 80, 3)).astype(np.uint8)
    png = _png(rgb)
    # Corrupt: flip bytes inside the compressed pixel data (chunk CRC no longer matches).
    i = png.index(b"IDAT") + 20
    corrupt = png[:i] + bytes(b ^ 0xFF for b in png[i:i + 16]) + png[i + 16:]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    files = {
        "corrupt.png": (corrupt, "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is a caption, not a picture\n", "not-an-image"),
        "bomb.png": (_bomb_png(20000, 20000), "too-large"),
    }
    out = {}
    for name, (data, kind) in files.items():
        (tmp_path / name).write_bytes(data)
        out[tmp_path / name] = kind
    out[tmp_path / "missing.jpg"] = "missing"
    (tmp_path / "a-directory.jpg").mkdir()  # tests run as root: chmod 000 would still read
    out[tmp_path / "a-directory.jpg"] = "unreadable"
    return out


def test_each_bad_kind_is_reported(bad_files):
    for path, kind in bad_files.items():
        with pytest.raises(ImageDecodeError) as e:
            read_image(path)
        assert e.value.kind == kind, (path.name, str(e.value))
        assert str(e.value).startswith(kind + ": ")


def test_pixel_limit_checked_from_header():
    # 20000 x 20000 would be 400 MB decoded; the check must refuse it before decoding, and
    # name the size and the option that raises the limit.
    with pytest.raises(ImageDecodeError, match=r"20000x20000 = 400000000 pixels.*--max-pixels"):
        decode_image_bytes(_bomb_png(20000, 20000))
    arr = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(ImageDecodeError, match="too-large"):
        decode_image_bytes(_png(arr), max_pixels=30 * 40 - 1)
    assert decode_image_bytes(_png(arr), max_pixels=30 * 40).shape == (30, 40, 3)
    # Pillow's own global limit is left as it was.
    assert Image.MAX_IMAGE_PIXELS == 89478485


def test_modes_converted_to_rgb(tmp_path):
    rs = np.random.RandomState(1)
    gray = rs.randint(0, 256, (12, 9)).astype(np.uint8)
    np.testing.assert_array_equal(decode_image_bytes(_png(gray)), np.stack([gray] * 3, -1))

    rgba = rs.randint(0, 256, (12, 9, 4)).astype(np.uint8)
    np.testing.assert_array_equal(decode_image_bytes(_png(rgba)), rgba[:, :, :3])

    pal = rs.randint(0, 256, (16, 3)).astype(np.uint8)
    idx = rs.randint(0, 16, (12, 9)).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image_bytes(buf.getvalue()), pal[idx])

    g16 = rs.randint(0, 65536, (12, 9)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")  # a 16-bit greyscale PNG
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    want = (g16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode_image_bytes(buf.getvalue()), np.stack([want] * 3, -1))

    # CMYK (TIFF, lossless): pure inks map to their RGB complements under any CMYK->RGB rule.
    cmyk = np.zeros((2, 3, 4), np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)    # cyan
    cmyk[0, 1] = (0, 255, 0, 0)    # magenta
    cmyk[0, 2] = (0, 0, 255, 0)    # yellow
    cmyk[1, 0] = (0, 0, 0, 255)    # black
    cmyk[1, 1] = (0, 0, 0, 0)      # paper white
    cmyk[1, 2] = (255, 255, 0, 0)  # blue
    buf = io.BytesIO()
    Image.frombytes("CMYK", (3, 2), cmyk.tobytes()).save(buf, format="TIFF")
    got = decode_image_bytes(buf.getvalue())
    np.testing.assert_array_equal(got, np.array(
        [[(0, 255, 255), (255, 0, 255), (255, 255, 0)],
         [(0, 0, 0), (255, 255, 255), (0, 0, 255)]], np.uint8))


def test_exif_orientation_applied():
    rs = np.random.RandomState(2)
    arr = rs.randint(0, 256, (20, 30, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    got = decode_image_bytes(_png(arr, exif=exif.tobytes()))
    assert got.shape == (30, 20, 3)
    np.testing.assert_array_equal(got, np.rot90(arr, k=-1))


def test_digest_is_file_digest(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_png(np.full((5, 6, 3), 7, np.uint8)))
    dec = read_image(p)
    assert dec.digest == file_digest(p) and dec.hw == (5, 6)
