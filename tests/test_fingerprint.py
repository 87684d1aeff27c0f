"""The content hash of a folder data.source (`tuneflow fingerprint`) follows ingest's folder rules for links."""

import pytest

from test_ingest import folder_source
from tasks.ingest import ingest
from tuneflow.artifacts import content_hash
from tuneflow.config import DataConfig
from tuneflow.data import source_fingerprint
from tuneflow.errors import InputError


@pytest.mark.parametrize("make, message", [
    (lambda folder, outside: (folder / "sport" / "leak.txt").symlink_to(outside / "secret.txt"),
     r"folder: sport/leak.txt links to .*secret.txt, outside the folder"),
    (lambda folder, outside: (folder / "elsewhere").symlink_to(outside, target_is_directory=True),
     r"folder: elsewhere links to .*outside, outside the folder"),
    (lambda folder, outside: (folder / "sport" / "loop.txt").symlink_to(folder / "sport" / "loop.txt"),
     r"folder: sport/loop.txt is a broken or looping symbolic link"),
    (lambda folder, outside: ((folder / "a").symlink_to(folder / "b"), (folder / "b").symlink_to(folder / "a")),
     r"folder: a is a broken or looping symbolic link"),
    (lambda folder, outside: (folder / "sport" / "gone.txt").symlink_to(folder / "sport" / "missing.txt"),
     r"folder: sport/gone.txt is a broken or looping symbolic link"),
])
def test_the_fingerprint_refuses_the_links_ingest_refuses(tmp_path, make, message):
    folder = folder_source(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not data")
    make(folder, outside)
    with pytest.raises(InputError, match=message):
        source_fingerprint(DataConfig(source=str(folder)))
    with pytest.raises(InputError, match=message):
        ingest(DataConfig(source=str(folder)), tmp_path / "data")


def test_links_inside_the_folder_are_hashed_as_links_never_followed(tmp_path):
    folder = folder_source(tmp_path)
    plain = content_hash(folder)
    (folder / "alias").symlink_to(folder / "money", target_is_directory=True)  # ingest reads it as a class
    (folder / "up").symlink_to(folder, target_is_directory=True)  # followed, this would recurse forever
    linked = source_fingerprint(DataConfig(source=str(folder)))
    assert linked not in (None, plain)
    (folder / "alias").unlink()
    (folder / "alias").symlink_to(folder / "music", target_is_directory=True)  # same files, another target
    assert content_hash(folder) != linked
    (folder / "alias").unlink()
    (folder / "up").unlink()
    assert content_hash(folder) == plain  # links gone: the hash of the plain folder again
    (folder / "music" / "10.txt").write_text("edited")
    assert content_hash(folder) != plain
