"""UploadReader: uploads are read, then gone from disk; identical uploads share the bytes briefly."""

import threading

import pytest

from mrg.uploads import UploadGone, UploadReader


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "uploads").mkdir()
    return tmp_path / "uploads"


def test_the_first_read_deletes_and_later_reads_share_the_bytes(folder):
    clock = Clock()
    reader = UploadReader(grace_s=60, wait_s=0, folder=lambda: folder.resolve(), clock=clock)
    upload = folder / "sha" / "x.dcm"
    upload.parent.mkdir()
    upload.write_bytes(b"pixels")
    assert reader.read(upload) == b"pixels" and not upload.exists()
    clock.now = 59
    assert reader.read(upload) == b"pixels" and reader.held() == 1
    clock.now = 61  # past the grace period: the bytes are released, the upload is gone
    assert reader.held() == 0
    with pytest.raises(UploadGone, match="upload it again"):
        reader.read(upload)


def test_a_file_gradio_has_not_moved_yet_is_waited_for(folder):
    reader = UploadReader(wait_s=5, folder=lambda: folder.resolve())
    upload, moving = folder / "late.png", folder.parent / "late.part"
    moving.write_bytes(b"late")  # Gradio moves a finished file in: it appears whole
    timer = threading.Timer(0.2, moving.replace, args=(upload,))
    timer.start()
    assert reader.read(upload) == b"late"
    timer.join()


def test_files_outside_the_upload_folder_are_left_alone(folder, tmp_path):
    reader = UploadReader(folder=lambda: folder.resolve())
    example = tmp_path / "example.png"
    example.write_bytes(b"example")
    assert reader.read(example) == b"example" and example.exists() and reader.held() == 0
