"""Image entry point: real DICOM radiographs, PNG/JPEG, typed errors, fuzzing, no PHI."""

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from mrg.imaging import ImageError, ImageLimits, load_image


def dicom(name: str) -> Path:
    return Path(get_testdata_file(name))


def png_bytes(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- real DICOM


def test_monochrome1_radiograph_is_inverted_so_lungs_are_dark():
    image = load_image(dicom("RG1_UNCI.dcm"))
    assert image.meta.photometric_interpretation == "MONOCHROME1"
    assert (
        "MONOCHROME1 inverted" in image.meta.windowing
        and "window 15000/30000" in image.meta.windowing
    )
    p = image.pixels
    h, w = p.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = (
        p[rows, int(0.2 * w) : int(0.35 * w)].mean() + p[rows, int(0.65 * w) : int(0.8 * w)].mean()
    ) / 2
    mediastinum = p[rows, int(0.45 * w) : int(0.55 * w)].mean()
    assert lungs < mediastinum - 0.15
    assert (
        image.meta.view == "frontal"
        and image.meta.modality == "CR"
        and image.meta.bits_stored == 15
    )


def test_jpeg2000_lossless_decodes_identical_to_uncompressed():
    compressed = load_image(dicom("RG1_J2KR.dcm"))
    assert "JPEG 2000" in compressed.meta.transfer_syntax
    assert np.array_equal(compressed.pixels, load_image(dicom("RG1_UNCR.dcm")).pixels)


def test_jpeg2000_lossy_is_close_to_uncompressed():
    lossy = load_image(dicom("RG1_J2KI.dcm")).pixels
    reference = load_image(dicom("RG1_UNCR.dcm")).pixels
    assert np.abs(lossy - reference).mean() < 0.01


def test_voi_lut_sequence_is_used():
    image = load_image(dicom("vlut_04.dcm"))
    assert "VOI LUT sequence" in image.meta.windowing
    ds = pydicom.dcmread(dicom("vlut_04.dcm"))
    from pydicom.pixels import apply_voi_lut

    expected = apply_voi_lut(ds.pixel_array, ds, prefer_lut=True) / float(
        np.max(ds.VOILUTSequence[0].LUTData)
    )
    assert np.allclose(image.pixels, expected, atol=1e-6)


def test_modality_lut_sequence_is_used():
    image = load_image(dicom("mlut_18.dcm"))
    assert image.meta.windowing.startswith("Modality LUT sequence")
    ds = pydicom.dcmread(dicom("mlut_18.dcm"))
    from pydicom.pixels import apply_modality_lut

    lut = apply_modality_lut(ds.pixel_array, ds)
    # the output is a monotone function of the LUT output, not of the raw values
    order = np.argsort(lut.ravel(), kind="stable")
    assert np.all(np.diff(image.pixels.ravel()[order]) >= -1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-LL.dcm",
        "MR_small_RLE.dcm",
        "JPEGLSNearLossless_16.dcm",
        "SC_jpeg_no_color_transform.dcm",
    ],
)
def test_compressed_transfer_syntaxes_decode(name):
    image = load_image(dicom(name))
    assert image.pixels.dtype == np.float32 and 0 <= image.pixels.min() and image.pixels.max() <= 1


def test_extension_is_not_trusted(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(dicom("RG1_UNCI.dcm").read_bytes())
    assert load_image(path).meta.format == "dicom"
    no_extension = tmp_path / "IM0001"
    no_extension.write_bytes(dicom("RG1_UNCI.dcm").read_bytes())
    assert load_image(no_extension).meta.format == "dicom"


# ----------------------------------------------------------------------------- refusals


def test_multi_frame_dicom_is_refused():
    with pytest.raises(ImageError, match="10 frames"):
        load_image(dicom("emri_small.dcm"))


def test_dicom_without_pixel_data_is_refused():
    with pytest.raises(ImageError, match="no image"):
        load_image(dicom("rtplan.dcm"))


def test_ct_slice_gets_a_warning():
    assert any("CT image" in w for w in load_image(dicom("CT_small.dcm")).meta.warnings)


def test_zero_byte_file_is_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def _png_header_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IDAT"
        + struct.pack(">I", zlib.crc32(b"IDAT"))
    )


def test_png_claiming_60000_squared_pixels_is_refused_before_decoding():
    with pytest.raises(ImageError, match="megapixel limit"):
        load_image(_png_header_claiming(60000, 60000))


def test_file_size_limit(tmp_path):
    data = png_bytes(np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageError, match="upload limit"):
        load_image(data, ImageLimits(max_file_bytes=len(data) - 1))


def test_dicom_pixel_limit():
    with pytest.raises(ImageError, match="megapixel"):
        load_image(dicom("RG1_UNCI.dcm"), ImageLimits(max_pixels=1_000_000))


def test_text_file_is_not_an_image():
    with pytest.raises(ImageError, match="not a PNG, JPEG or DICOM"):
        load_image(b"FINDINGS: The heart is normal.\n" * 20)


def test_truncated_png_and_dicom_are_refused():
    data = png_bytes((np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8))
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])
    raw = dicom("RG1_UNCI.dcm").read_bytes()
    with pytest.raises(ImageError):
        load_image(raw[: len(raw) // 3])


# ----------------------------------------------------------------------------- PNG / JPEG


def test_rgb_photograph_becomes_greyscale_with_a_warning():
    rng = np.random.default_rng(0)
    photo = np.zeros((96, 128, 3), np.uint8)
    photo[..., 0] = 200
    photo[..., 1] = rng.integers(0, 255, (96, 128))
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG")
    image = load_image(buffer.getvalue())
    assert image.pixels.shape == (96, 128)
    assert any("colour image" in w for w in image.meta.warnings)


def test_greyscale_saved_as_rgb_has_no_warning():
    grey = np.tile(np.arange(256, dtype=np.uint8), (32, 1))
    image = load_image(png_bytes(np.stack([grey] * 3, -1)))
    assert image.meta.warnings == [] and np.allclose(image.pixels, grey / 255.0, atol=1 / 255)


def test_16_bit_png_keeps_its_depth():
    ramp = (np.linspace(1000, 5000, 4000).reshape(40, 100)).astype(np.uint16)
    image = load_image(png_bytes(ramp))
    assert image.meta.bits_stored == 16
    assert len(np.unique(image.pixels)) > 1000  # an 8-bit detour would leave at most 256 levels
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_exif_orientation_is_honoured():
    array = np.zeros((40, 80), np.uint8)
    array[:, :10] = 255  # a bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif, quality=95)
    image = load_image(buffer.getvalue())
    assert image.pixels.shape == (80, 40)
    assert image.pixels[:10].mean() > 0.9  # the band is now at the top


# ----------------------------------------------------------------------------- fuzzing

SEEDS = [
    png_bytes((np.random.default_rng(1).random((32, 32)) * 255).astype(np.uint8)),
    dicom("CT_small.dcm").read_bytes(),
    dicom("MR_small_RLE.dcm").read_bytes(),
]


def _only_typed_errors(data: bytes) -> None:
    try:
        image = load_image(data, ImageLimits(max_pixels=4_000_000))
    except ImageError as err:
        assert str(err)
    else:
        assert image.pixels.ndim == 2 and np.isfinite(image.pixels).all()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_give_only_typed_errors(data):
    _only_typed_errors(data)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.floats(0, 1))
def test_truncated_files_give_only_typed_errors(index, fraction):
    seed = SEEDS[index]
    _only_typed_errors(seed[: int(len(seed) * fraction)])


@FUZZ
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=12),
)
def test_mutated_files_give_only_typed_errors(index, mutations):
    data = bytearray(SEEDS[index])
    for where, value in mutations:
        data[min(int(where * len(data)), len(data) - 1)] = value
    _only_typed_errors(bytes(data))


# ----------------------------------------------------------------------------- privacy

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC-5544332",
    "InstitutionName": "Springfield General Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20240229",
    "OtherPatientIDs": "OTHER-12345",
}


def test_no_identifying_attribute_reaches_metadata_or_logs(tmp_path, caplog):
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.Modality = "DX"
    path = tmp_path / "phi.dcm"
    ds.save_as(path)
    corrupt = path.read_bytes()[:-5000]
    with caplog.at_level(logging.DEBUG):
        image = load_image(path)
        with pytest.raises(ImageError) as err:
            load_image(corrupt)
    shown = repr(image.meta.to_dict()) + caplog.text + str(err.value)
    for value in PHI.values():
        for part in value.split("^"):
            assert part not in shown


def test_the_viewer_keeps_the_modality_values_not_the_display_copy():
    from pydicom.pixels import apply_modality_lut

    from mrg.imaging import VALUES_SIDE
    from mrg.windowing import window

    path = get_testdata_file("RG1_UNCI.dcm")
    image = load_image(path)
    ds = pydicom.dcmread(path)
    raw = apply_modality_lut(ds.pixel_array, ds)
    assert image.inverted and image.file_window == (15000.0, 30000.0)
    assert max(image.values.shape) == VALUES_SIDE and image.values.dtype == np.float32
    # box-downsampled modality values: their range, not [0, 1]
    assert raw.min() <= image.values.min() < image.values.max() <= raw.max()
    assert image.values.max() > 255
    # the file's own window over the kept values is the picture the file means
    size = image.values.shape[::-1]
    shown = np.asarray(Image.fromarray(image.pixels, mode="F").resize(size, Image.BOX))
    assert np.abs(window(image, *image.file_window) - shown).max() < 1e-3
    assert np.allclose(window(image, 2000, 3000, invert=True), 1 - window(image, 2000, 3000))


def test_a_16_bit_png_keeps_its_stored_values(tmp_path):
    from mrg.windowing import preset_window

    values = np.linspace(0, 4000, 64 * 80, dtype=np.uint16).reshape(64, 80)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.values.shape == (64, 80) and image.values.max() == 4000
    assert not image.inverted and image.file_window is None
    low_center, _ = preset_window(image, "lung")
    high_center, _ = preset_window(image, "bone")
    assert low_center < high_center  # lung spreads the dark values, bone the bright ones
