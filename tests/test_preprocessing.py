"""Image decoding, model-input preparation, heatmap overlays and atomic PNG writing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainrt.errors import ImageReadError, InvalidInputError, InvalidModelError
from explainrt.overlay import overlay, save_png
from explainrt.preprocessing import Preprocessing, load_image


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A deterministic 48x64 RGB test image."""
    return np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


# --- load_image ---------------------------------------------------------------------------------


def test_png_file_round_trips_exactly(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (48, 64, 3)
    np.testing.assert_array_equal(loaded, rgb)
    np.testing.assert_array_equal(load_image(str(path)), rgb)


def test_jpeg_file_decodes_close_to_original(tmp_path: Path) -> None:
    rows, columns = np.mgrid[0:48, 0:64]
    smooth = np.stack([rows * 5, columns * 4, 255 - rows * 2 - columns], axis=2).astype(np.uint8)
    path = tmp_path / "image.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.shape == smooth.shape and loaded.dtype == np.uint8
    assert np.abs(loaded.astype(int) - smooth.astype(int)).mean() < 2


def test_bytes_input_matches_file_input(tmp_path: Path, rgb: np.ndarray) -> None:
    encoded = _encode(Image.fromarray(rgb), "PNG")
    (tmp_path / "image.png").write_bytes(encoded)
    np.testing.assert_array_equal(load_image(encoded), load_image(tmp_path / "image.png"))


def test_grayscale_file_becomes_three_equal_channels(tmp_path: Path, rgb: np.ndarray) -> None:
    gray = rgb[:, :, 0]
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    loaded = load_image(path)
    assert loaded.shape == (48, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], gray)


def test_sixteen_bit_grayscale_keeps_its_high_byte(tmp_path: Path) -> None:
    values = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded[:, :, 1], (values >> 8).astype(np.uint8))


def test_rgba_and_palette_files_become_rgb(tmp_path: Path, rgb: np.ndarray) -> None:
    alpha = np.full(rgb.shape[:2] + (1,), 7, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)

    palette_image = Image.fromarray(rgb).quantize(colors=16)
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png"), np.asarray(palette_image.convert("RGB")))


def test_exif_orientation_is_applied(tmp_path: Path, rgb: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif)
    assert load_image(path).shape == (64, 48, 3)


def test_pil_image_and_arrays(rgb: np.ndarray) -> None:
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(load_image(rgb), rgb)
    assert load_image(rgb) is not rgb
    gray = load_image(rgb[:, :, 0])
    assert gray.shape == (48, 64, 3)
    np.testing.assert_array_equal(gray[:, :, 2], rgb[:, :, 0])


def test_corrupt_file_names_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="cannot identify image file") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path: Path, rgb: np.ndarray) -> None:
    encoded = _encode(Image.fromarray(np.tile(rgb, (4, 4, 1))), "JPEG")
    path = tmp_path / "half.jpg"
    path.write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file") as info:
        load_image(tmp_path / "absent.png")
    assert "absent.png" in str(info.value)
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path)


def test_empty_and_garbage_bytes() -> None:
    with pytest.raises(ImageReadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageReadError, match="<5 bytes>"):
        load_image(b"hello")


def test_too_many_pixels_is_refused_before_decoding(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(ImageReadError, match="3072 pixels exceeds the limit of 3000") as info:
        load_image(path, max_pixels=3000)
    assert str(path) in str(info.value)
    assert load_image(path, max_pixels=3072).shape == (48, 64, 3)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "float image arrays"),
        (np.zeros((4, 4, 3), dtype=np.uint16), "must be uint8"),
        (np.zeros((4, 4, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (42, "unsupported image source of type int"),
    ],
)
def test_bad_in_memory_sources(source: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_image(source)  # type: ignore[arg-type]


# --- Preprocessing --------------------------------------------------------------------------------

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_json_round_trip() -> None:
    original = Preprocessing((224, 200), 256, labels=("cat", "dog"), interpolation="bicubic", **_IMAGENET)
    restored = Preprocessing.from_json(original.to_json())
    assert restored == original and hash(restored) == hash(original)
    assert isinstance(restored.input_size, tuple) and isinstance(restored.labels, tuple)
    minimal = Preprocessing.from_json(json.dumps({"input_size": [8, 8], "resize_shorter": None, **_IMAGENET}))
    assert minimal.labels is None and minimal.interpolation == "bilinear"


_VALID = {"input_size": [224, 224], "resize_shorter": 256, **_IMAGENET}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({**_VALID, "extra": 1}), "unknown fields"),
        (json.dumps({"input_size": [224, 224], "mean": [0, 0, 0], "std": [1, 1, 1]}), "lacks required"),
        (json.dumps({**_VALID, "input_size": [224]}), "input_size"),
        (json.dumps({**_VALID, "input_size": [224, True]}), "input_size"),
        (json.dumps({**_VALID, "input_size": "224"}), "input_size"),
        (json.dumps({**_VALID, "resize_shorter": 100}), "resize_shorter"),
        (json.dumps({**_VALID, "resize_shorter": -1}), "resize_shorter"),
        (json.dumps({**_VALID, "mean": [0.5, 0.5]}), "mean"),
        (json.dumps({**_VALID, "mean": [0.5, 0.5, "x"]}), "mean"),
        (json.dumps({**_VALID, "std": [0.2, 0.0, 0.2]}), "positive"),
        (json.dumps({**_VALID, "labels": ["a", 3]}), "labels"),
        (json.dumps({**_VALID, "labels": "abc"}), "labels"),
        (json.dumps({**_VALID, "interpolation": "lanczos"}), "interpolation"),
    ],
)
def test_malformed_json_is_invalid_model(text: str, message: str) -> None:
    with pytest.raises(InvalidModelError, match=message):
        Preprocessing.from_json(text)


def test_prepare_direct_resize_matches_manual_computation(rgb: np.ndarray) -> None:
    preprocessing = Preprocessing(input_size=(32, 40), resize_shorter=None, **_IMAGENET)
    batch, crops = preprocessing.prepare([rgb, rgb[:, ::-1]])
    assert batch.shape == (2, 3, 32, 40) and batch.dtype == np.float32 and batch.flags.c_contiguous
    assert crops.shape == (2, 32, 40, 3) and crops.dtype == np.uint8
    expected_crop = np.asarray(Image.fromarray(rgb).resize((40, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(crops[0], expected_crop)
    expected = (expected_crop / 255.0 - np.array(_IMAGENET["mean"])) / np.array(_IMAGENET["std"])
    np.testing.assert_allclose(batch[0], expected.transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (256, 256)])
@pytest.mark.parametrize(("input_size", "resize_shorter"), [((224, 224), 256), ((200, 240), 240)])
def test_prepare_matches_torchvision(
    shape: tuple[int, int], input_size: tuple[int, int], resize_shorter: int
) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    image = np.random.default_rng(2).integers(0, 256, size=shape + (3,), dtype=np.uint8)
    preprocessing = Preprocessing(input_size=input_size, resize_shorter=resize_shorter, **_IMAGENET)
    batch, crops = preprocessing.prepare([image])

    resize_crop = transforms.Compose([transforms.Resize(resize_shorter), transforms.CenterCrop(input_size)])
    expected_crop = resize_crop(Image.fromarray(image))
    np.testing.assert_array_equal(crops[0], np.asarray(expected_crop))
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(**_IMAGENET)])
    np.testing.assert_allclose(batch[0], normalise(expected_crop).numpy(), atol=1e-6)


def test_prepare_accepts_mixed_sources(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(tmp_path / "image.png")
    preprocessing = Preprocessing(input_size=(24, 24), resize_shorter=32, **_IMAGENET)
    batch, crops = preprocessing.prepare([rgb, tmp_path / "image.png", _encode(Image.fromarray(rgb), "PNG")])
    for index in (1, 2):
        np.testing.assert_array_equal(crops[index], crops[0])
        np.testing.assert_array_equal(batch[index], batch[0])


def test_prepare_rejects_non_batches(rgb: np.ndarray) -> None:
    preprocessing = Preprocessing(input_size=(24, 24), resize_shorter=None, **_IMAGENET)
    with pytest.raises(InvalidInputError, match="wrap a single image"):
        preprocessing.prepare(rgb)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="wrap a single image"):
        preprocessing.prepare("image.png")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at least one image"):
        preprocessing.prepare([])


# --- overlay and save_png -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0, 0.0])
def test_overlay_matches_pytorch_grad_cam(rgb: np.ndarray, alpha: float) -> None:
    image_utils = pytest.importorskip("pytorch_grad_cam.utils.image")
    # Covers every colour-table entry, plus the exact ends 0 and 1.
    saliency = np.linspace(0, 1, rgb.shape[0] * rgb.shape[1], dtype=np.float32).reshape(rgb.shape[:2])
    expected = image_utils.show_cam_on_image(
        rgb.astype(np.float32) / 255, saliency, use_rgb=True, image_weight=1 - alpha
    )
    result = overlay(rgb, saliency, alpha=alpha)
    assert result.dtype == np.uint8 and result.shape == rgb.shape
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 1


def test_overlay_of_random_map_matches_pytorch_grad_cam(rgb: np.ndarray) -> None:
    image_utils = pytest.importorskip("pytorch_grad_cam.utils.image")
    saliency = np.random.default_rng(3).random(rgb.shape[:2])
    expected = image_utils.show_cam_on_image(rgb.astype(np.float32) / 255, saliency, use_rgb=True)
    assert np.abs(overlay(rgb, saliency).astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("image", "saliency", "options", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9)), {}, "does not match"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8)), {}, "uint8"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8)), {}, "uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), {}, "float"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 2.0), {}, r"\[0, 1\]"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan), {}, "NaN"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), {"alpha": 1.5}, "alpha"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), {"colormap": "viridis"}, "unknown colormap"),
    ],
)
def test_overlay_validates(image: np.ndarray, saliency: np.ndarray, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        overlay(image, saliency, **options)


def test_overlay_tolerates_rounding_outside_unit_range(rgb: np.ndarray) -> None:
    saliency = np.full(rgb.shape[:2], 1.0000001)
    saliency[0, 0] = -1e-7
    assert overlay(rgb, saliency).shape == rgb.shape


def test_save_png_round_trips_and_leaves_no_temporary(tmp_path: Path, rgb: np.ndarray) -> None:
    path = save_png(tmp_path / "out.png", rgb)
    assert path == tmp_path / "out.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.png"]


def test_failed_save_keeps_previous_file(tmp_path: Path, rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"previous")

    def fail_halfway(self: Image.Image, file: io.BufferedWriter, **_: object) -> None:
        file.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_png(path, rgb)
    assert path.read_bytes() == b"previous"
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.png"]


def test_save_png_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="uint8"):
        save_png(tmp_path / "out.png", np.zeros((4, 4, 3), np.float64))
    assert not any(tmp_path.iterdir())
