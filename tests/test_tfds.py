"""tfds datasets streamed into a store cache through the one image path (cnnpipe.datasets.tfds).

Everything runs under `tfds.testing.mock_data`: no download, deterministic records.
`tf_flowers` (mocked) has RGB images of varying sizes; `gray_varying` and `deep16`,
defined here, add gray images of varying sizes and 16-bit colour images.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from cnnpipe.cli import main  # noqa: E402
from cnnpipe.datasets.store import load_store  # noqa: E402
from cnnpipe.datasets.tfds import PLANE_NAMES, tfds_dataset  # noqa: E402
from cnnpipe.images.transform import ImageSpec, prepare_bytes  # noqa: E402


class GrayVarying(tfds.core.GeneratorBasedBuilder):
    """Gray images of varying sizes, 3 classes (records come from mock_data)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
        yield from ()


class Deep16(GrayVarying):
    """16-bit RGB images of varying sizes, 2 classes."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint16),
            "label": tfds.features.ClassLabel(names=["x", "y"])}))


def mock(n):
    return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def _records(name, split, n):
    with mock(n):
        src = tfds.data_source(name, split=split)
        return [(np.asarray(src[i]["image"]), int(src[i]["label"])) for i in range(len(src))]


def _png(img):
    buf = io.BytesIO()
    if img.dtype == np.uint16:  # Pillow cannot write 16-bit RGB: go through imagecodecs
        import imagecodecs
        return imagecodecs.png_encode(img)
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,size,channels,want_planes,bits", [
    ("tf_flowers", (24, 20), None, 3, 8),     # RGB, varying sizes
    ("gray_varying", (16, 16), None, 1, 8),   # gray stays gray
    ("gray_varying", (16, 16), "rgb", 3, 8),  # gray expanded to R = G = B, as folders do
    ("deep16", (12, 18), None, 3, 16),        # 16-bit kept exactly
])
def test_rows_are_the_image_paths_pixels(tmp_path, name, size, channels, want_planes, bits):
    with mock(9):
        ds = tfds_dataset(name, size=size, resize="crop", channels=channels, cache_dir=tmp_path)
    assert ds.size == size and ds.channels == want_planes and ds.bit_depth == bits
    assert len(ds.train) == 9 and len(ds.val) == 9
    spec = ImageSpec(size, "crop", channels or ("gray" if want_planes == 1 else "rgb"), bits)
    records = _records(name, "train", 9)
    assert len({img.shape for img, _ in records}) > 1  # the mock really varies the size
    for i, (img, label) in enumerate(records):
        # the same pixels as predict gets from the record saved as a PNG file: tolerance 0
        want = prepare_bytes(_png(img), spec, f"record {i}").pixels
        np.testing.assert_array_equal(ds.train.images[i], want)
        assert ds.train.labels[i] == label
    flat = np.asarray(ds.train.images, np.float64).reshape(-1, want_planes)
    np.testing.assert_allclose(ds.mean, flat.mean(0), rtol=1e-9)
    assert isinstance(ds.train.images, np.memmap)  # training reads the store, not a copy in RAM


def test_fixed_size_dataset_keeps_its_size_and_planes(tmp_path):
    with mock(12):
        ds = tfds_dataset("mnist", cache_dir=tmp_path)
    assert ds.size == (28, 28) and ds.channels == 1 and ds.bit_depth == 8
    assert ds.classes == [str(i) for i in range(10)]
    records = _records("mnist", "train", 12)
    np.testing.assert_array_equal(np.asarray(ds.train.images), np.stack([r[0] for r in records]))
    np.testing.assert_array_equal(ds.train.labels, [r[1] for r in records])


def test_cache_is_written_once_and_keyed_by_settings(tmp_path, monkeypatch):
    import cnnpipe.datasets.tfds as mod

    with mock(6):
        first = tfds_dataset("gray_varying", size=(8, 8), cache_dir=tmp_path)
        monkeypatch.setattr(mod, "_write", lambda *a: pytest.fail("the cache was rebuilt"))
        again = tfds_dataset("gray_varying", size=(8, 8), cache_dir=tmp_path)
        monkeypatch.undo()
        other = tfds_dataset("gray_varying", size=(8, 8), resize="pad", cache_dir=tmp_path)
    with mock(7):  # another split length is another dataset
        bigger = tfds_dataset("gray_varying", size=(8, 8), cache_dir=tmp_path)
    caches = sorted(p.name for p in (tmp_path / "tfds").iterdir())
    assert len(caches) == 3 and all(c.startswith("gray_varying-") for c in caches)
    assert first.description == again.description and other.description != first.description
    assert len(bigger.train) == 7
    meta = json.loads((tmp_path / "tfds" / caches[0] / "meta.json").read_text())
    assert meta["source"] == "tfds:gray_varying/1.0.0" and meta["counts"]["train"]["tfds_split"] == "train"


def test_bad_record_is_skipped_and_reported(tmp_path, monkeypatch):
    import cnnpipe.datasets.tfds as mod

    real = mod._planes

    def flaky(image, source):
        if source.endswith("train[2]"):
            raise ValueError(f"{source}: broken record")
        return real(image, source)

    monkeypatch.setattr(mod, "_planes", flaky)
    with mock(5):
        ds = tfds_dataset("tf_flowers", size=(8, 8), cache_dir=tmp_path)
    assert len(ds.train) == 4 and len(ds.val) == 5
    report = load_store(next((tmp_path / "tfds").iterdir())).report
    assert report["skipped"] == [{"source": "tfds:tf_flowers/train[2]",
                                  "reason": "tfds:tf_flowers/train[2]: broken record"}]


def test_errors_name_the_setting(tmp_path):
    with mock(3), pytest.raises(ValueError, match=r"data.size: tfds dataset 'tf_flowers' has images of varying"):
        tfds_dataset("tf_flowers", cache_dir=tmp_path)
    with mock(3), pytest.raises(ValueError, match=r"data.name: cannot open tfds dataset 'no_such_set'"):
        tfds_dataset("no_such_set", cache_dir=tmp_path)
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").iterdir())
    assert PLANE_NAMES[1] == ("L",)


def test_variable_size_dataset_trains_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    settings = ["data.source=tfds", "data.name=tf_flowers", "data.size=[24,24]", "data.split_val=train[80%:]",
                f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.batch_size=8",
                "train.eval_batch_size=8", "train.checkpoint_every_steps=0",
                "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"]
    with mock(32):
        rc = main(["train", "--workdir", str(run_dir), *[a for s in settings for a in ("--set", s)]])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((run_dir / "dataset.json").read_text())
    assert info["size"] == [24, 24] and info["channels"] == 3 and len(info["classes"]) == 5
    assert summary["steps"] == 2 * (32 // 8) and sum(map(sum, summary["confusion_matrix"])) == 32
    # the saved config is resolved: evaluate/predict of this run need nothing from the data's defaults
    assert "channels: rgb" in (run_dir / "config.yaml").read_text()


def test_native_channels_keep_the_records_planes_and_names(tmp_path):
    with mock(5):
        ds = tfds_dataset("deep16", size=(8, 8), channels="native", cache_dir=tmp_path)
        gray = tfds_dataset("gray_varying", size=(8, 8), channels="native", cache_dir=tmp_path)
    assert ds.channels == 3 and ds.plane_names == ("R", "G", "B") and ds.bit_depth == 16
    assert gray.channels == 1 and gray.plane_names == ("L",)
    from cnnpipe.datasets.tfds import plane_names
    assert plane_names(5) == ("S0", "S1", "S2", "S3", "S4") and plane_names(2) == ("L", "A")
