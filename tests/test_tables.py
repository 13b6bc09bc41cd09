"""Label tables as users make them: Excel CSV, TSV, JSON Lines, Parquet, Hugging Face metadata; every row
and file accounted for; one-line errors naming the table and the column or value."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from cnnpipe.datasets.dataset import store_dataset
from cnnpipe.datasets.preprocess import preprocess
from cnnpipe.datasets.table_scan import LabelTable
from cnnpipe.datasets.tables import TableError, read_table

LATIN1 = os.fsdecode(b"caf\xe9.png")  # a name that is not UTF-8: a Latin-1 tool wrote it


def png(path, value: int, size=(5, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def folder(root, n: int = 12):
    """root/img<i>.png (pixel value i) with a few in a subfolder; returns {relative path: value}."""
    files = {}
    for i in range(n):
        rel = f"sub/img{i:02d}.png" if i % 4 == 0 else f"img{i:02d}.png"
        png(root / rel, 10 * i % 256)
        files[rel] = 10 * i % 256
    return files


def run(src, out, **kw):
    kw.setdefault("size", (5, 6))
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return preprocess(src, out, **kw)


def stored(store):
    """{source path: (class name, pixel value, split)} of every stored row."""
    out = {}
    for split in store.splits:
        images, labels = store.images(split), store.labels(split)
        for i, src in enumerate(store.sources(split)):
            out[src] = (store.classes[labels[i]], int(images[i, 0, 0, 0]), split)
    return out


def test_an_excel_csv_with_bom_crlf_quotes_ids_subfolders_and_a_latin1_name(tmp_path):
    src = tmp_path / "images"
    files = folder(src)
    png(src / 'odd, "name".png', 200)
    png(src / os.fsencode(LATIN1).decode("utf-8", "surrogateescape"), 210)  # the same str: its bytes are Latin-1
    rows = [b"file_name,label"]
    for i, rel in enumerate(sorted(files)):
        path = rel[:-4] if i % 2 else rel   # every other row an id without its extension
        rows.append(f"{path},{'01' if i % 3 else '1'}".encode())
    rows += [b'"odd, ""name"".png",01', b"caf\xe9.png,1"]
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\r\n\r\n\r\n")
    store = run(src, tmp_path / "store", labels=tmp_path / "labels.csv", val_fraction=0.0)
    assert store.classes == ["01", "1"]   # text as written: "01" and "1" are two classes; the BOM is not in a name
    got = stored(store)
    for i, rel in enumerate(sorted(files)):
        assert got[rel][:2] == ("01" if i % 3 else "1", files[rel])
    assert got['odd, "name".png'][:2] == ("01", 200)
    assert got["caf\\xe9.png"][:2] == ("1", 210)   # stored under its display form, pixels of that very file
    assert store.report["skipped"] == [] and store.meta["labels"]["path_col"] == "file_name"
    assert store.report["counts"]["table_rows"] == len(files) + 2


def _write_formats(tmp_path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(records[0])
    (tmp_path / "t.csv").write_text("\n".join([",".join(cols)] + [",".join(r[c] for c in cols) for r in records]))
    (tmp_path / "t.tsv").write_text("\n".join(["\t".join(cols)] + ["\t".join(r[c] for c in cols) for r in records]))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({c: [r[c] for r in records] for c in cols}), tmp_path / "t.parquet")
    return [tmp_path / f"t.{ext}" for ext in ("csv", "tsv", "jsonl", "parquet")]


def test_csv_tsv_jsonl_and_parquet_give_byte_identical_stores(tmp_path):
    src = tmp_path / "images"
    files = folder(src, 16)
    records = [{"path": rel, "y": ["cat", "dog"][i % 2], "patient": f"p{i // 3}"}
               for i, rel in enumerate(sorted(files))]
    stores = [run(src, tmp_path / f"s_{t.suffix[1:]}", labels=LabelTable(str(t), label_col="y", group_col="patient"),
                  val_fraction=0.25) for t in _write_formats(tmp_path, records)]
    first = stores[0]
    for other in stores[1:]:
        for split in first.splits:
            for name in ("images.npy", "labels.npy", "sources.json"):
                assert (first.path / split / name).read_bytes() == (other.path / split / name).read_bytes()
    assert first.meta["split"]["method"] == "group"   # a group column: grouped by default
    patients = {r["path"]: r["patient"] for r in records}
    by_split = {s: {patients[p] for p in first.sources(s)} for s in first.splits}
    assert by_split["train"].isdisjoint(by_split["val"])


def cli(args, capsys):
    """`cnnpipe ARGS` in this process: (exit status, stdout, stderr)."""
    from cnnpipe.cli import main

    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_every_row_and_file_is_accounted_for(tmp_path, capsys):
    src = tmp_path / "images"
    files = folder(src, 8)
    png(src / "unlisted.png", 1)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = ["path,label"] + [f"{rel},{'ab'[i % 2]}" for i, rel in enumerate(sorted(files))]
    lines += ["missing.png,a", "img01.png,a",   # img01 is listed as b above: both rows conflict
              "img02.png,a",                     # the same as its first row: a repeat, kept once
              "img03.png,", "broken.png,b", ",", "notes,a"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    store = run(src, tmp_path / "store", labels=tmp_path / "t.csv", val_fraction=0.0)
    kinds = {s["path"]: s["kind"] for s in store.report["skipped"]}
    # rows 2-9 list the files in path order: img01 (a), img02 (b), img03 (a), ...
    assert kinds == {"t.csv row 10": "missing_file", "t.csv row 11": "duplicate_row",
                     "t.csv row 3": "conflicting_labels", "t.csv row 12": "conflicting_labels",
                     "t.csv row 13": "empty_label", "broken.png": "corrupt", "t.csv row 15": "empty_row",
                     "notes.txt": "not_image", "unlisted.png": "no_row"}
    assert set(stored(store)) == set(files) - {"img02.png"}   # img03's first row is good: it is stored
    status, out, err = cli(["preprocess", src, tmp_path / "s2", "--size", "5x6", "--labels", tmp_path / "t.csv",
                            "--workers", "1"], capsys)
    assert status == 1, err   # the store was written; rows failed
    assert "6 input file(s) failed" in out


@pytest.mark.parametrize("table, options, message", [
    ("path,label\n", {}, r"t.csv: the table has no rows \(columns: path, label\)"),
    ("path,lable\na.png,x\n", {}, r"t.csv: no --label-col column \('label'\); pass --label-col NAME "
                                  r"\(columns: path, lable\)"),
    ("path,label\na.png,x\n", {"label_col": "lbl"}, r"--label-col 'lbl': no such column \(columns: path, label\); "
                                                      r"did you mean 'label'\?"),
    ("name,label\na.png,x\n", {}, r"no --path-col column \('file_name' or 'path' or 'filename' or 'image' or 'id'\)"),
    ("path,label\nimg00.png,x\nimg01.png,x\n", {}, r"label column 'label' holds one class \('x'\)"),
    ("path,label,p\nimg00.png,x,1\nimg01.png,y,1\n", {"group_col": "p"}, r"group column 'p' holds one group"),
    ("path,label\nimg00.png,x\nimg01.png,y,z\n", {}, r"t.csv row 3: expected 2 columns \(','-separated\), got 3"),
])
def test_a_table_that_cannot_be_used_is_one_line_naming_it(tmp_path, table, options, message):
    src = tmp_path / "images"
    folder(src, 4)
    (tmp_path / "t.csv").write_text(table)
    with pytest.raises(TableError, match=message):
        run(src, tmp_path / "store", labels=LabelTable(str(tmp_path / "t.csv"), **options))
    assert not (tmp_path / "store").exists()


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    src = tmp_path / "images"
    folder(src, 6)
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"img0{i}.png,{'ab'[i % 2]}\n" for i in (1, 2, 3, 5)))
    base = ["preprocess", src, tmp_path / "out", "--size", "4"]
    for extra, text in ((["--labels", str(tmp_path / "t.csv"), "--folds", "3"],
                         "folds: 3 folds need at least 3 images of every class; class 'a' has 1"),
                        (["--group-col", "p"], "--group-col: only used with --labels TABLE"),
                        (["--labels", str(tmp_path / "t.xlsx")], "unknown table format '.xlsx'"),
                        (["--labels", str(tmp_path / "none.csv")], "none.csv: label table not found")):
        status, _, err = cli(base + extra, capsys)
        last = err.splitlines()[-1]   # progress lines come first off a terminal
        assert status == 2 and last.startswith("cnnpipe preprocess: error: ") and text in last, err


def test_hugging_face_metadata_is_read_without_labels(tmp_path):
    src = tmp_path / "images"
    files = folder(src, 6)
    (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": rel, "label": i % 2, "text": "x"}) + "\n"
                                                for i, rel in enumerate(sorted(files))))
    store = run(src, tmp_path / "store", val_fraction=0.0)
    assert store.classes == ["0", "1"] and store.report["layout"] == "table"
    assert len(stored(store)) == 6 and store.report["skipped"] == []   # the metadata file is not an unlisted file


def test_split_and_fold_columns_are_kept_as_given(tmp_path):
    src = tmp_path / "images"
    files = sorted(folder(src, 12))
    given = ["train", "valid", "test", "Validation"]
    (tmp_path / "s.csv").write_text("path,label,split,is_valid,fold\n" + "".join(
        f"{rel},{'ab'[i % 2]},{given[i % 4]},{'True' if i % 3 == 0 else 'False'},{1 + i % 3}\n"
        for i, rel in enumerate(files)))
    want = {"train": "train", "valid": "val", "test": "test", "Validation": "val"}
    store = run(src, tmp_path / "a", labels=LabelTable(str(tmp_path / "s.csv"), split_col="split"))
    assert {p: v[2] for p, v in stored(store).items()} == {rel: want[given[i % 4]] for i, rel in enumerate(files)}
    assert store.meta["split"]["method"] == "column"
    store = run(src, tmp_path / "b", labels=LabelTable(str(tmp_path / "s.csv"), split_col="is_valid"))
    assert {p: v[2] for p, v in stored(store).items()} == {
        rel: "val" if i % 3 == 0 else "train" for i, rel in enumerate(files)}
    store = run(src, tmp_path / "c", labels=LabelTable(str(tmp_path / "s.csv"), fold_col="fold"))
    folds = dict(zip(store.sources("train"), store.folds("train").tolist()))
    assert store.num_folds == 3 and folds == {rel: i % 3 for i, rel in enumerate(files)}


def test_the_store_does_not_depend_on_the_tables_row_order(tmp_path):
    src = tmp_path / "images"
    files = sorted(folder(src, 20))
    rows = [f"{rel},{'abc'[i % 3]},g{i // 2}" for i, rel in enumerate(files)]
    stores = []
    for n, order in enumerate((rows, random.Random(1).sample(rows, len(rows)))):
        (tmp_path / f"t{n}.csv").write_text("path,label,g\n" + "\n".join(order) + "\n")
        stores.append(run(src, tmp_path / f"s{n}", labels=LabelTable(str(tmp_path / f"t{n}.csv"), group_col="g"),
                          folds=2, test_fraction=0.2))
    for split in stores[0].splits:
        for name in ("images.npy", "labels.npy", "sources.json") + (("folds.npy",) if split == "train" else ()):
            assert (stores[0].path / split / name).read_bytes() == (stores[1].path / split / name).read_bytes()


def test_a_fold_trains_on_the_other_folds_with_their_own_statistics(tmp_path):
    src = tmp_path / "images"
    folder(src, 18)
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(
        f"{rel},{'ab'[i % 2]}\n" for i, rel in enumerate(sorted(folder(src, 18)))))
    store = run(src, tmp_path / "store", labels=tmp_path / "t.csv", folds=3)
    assert store.splits == ["train"] and store.num_folds == 3
    images, labels, folds = np.asarray(store.images("train")), store.labels("train"), store.folds("train")
    assert sorted(np.bincount(folds).tolist()) == [6, 6, 6]
    for k in range(3):
        ds = store_dataset(store.path, fold=k)
        assert len(ds.val) == 6 and len(ds.train) == 12
        np.testing.assert_array_equal(np.asarray(ds.val.images), images[folds == k])
        np.testing.assert_array_equal(ds.train.labels, labels[folds != k])
        rest = images[folds != k].astype(np.float64)
        np.testing.assert_allclose(ds.mean, rest.mean(axis=(0, 1, 2)), rtol=1e-12)
        np.testing.assert_allclose(ds.std, np.maximum(rest.std(axis=(0, 1, 2)), 1.0), rtol=1e-9)
    with pytest.raises(ValueError, match=r"data.fold: .* holds 3 cross-validation folds; set data.fold \(0-2\)"):
        store_dataset(store.path)
    with pytest.raises(ValueError, match=r"data.fold: got 3; .* holds folds 0-2"):
        store_dataset(store.path, fold=3)


def test_read_table_keeps_text_as_written_and_names_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "007", "label": 1}\n\n{"id": 8, "label": "01", "extra": [1]}\n')
    t = read_table(tmp_path / "a.jsonl")
    assert t.columns == {"id": ["007", "8"], "label": ["1", "01"], "extra": [None, "[1]"]}
    assert [t.where(i) for i in range(2)] == ["a.jsonl line 1", "a.jsonl line 3"]
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(TableError, match=r"b.jsonl line 2: expected a JSON object, got list"):
        read_table(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("id,id\n1,2\n")
    with pytest.raises(TableError, match=r"column 'id' appears twice"):
        read_table(tmp_path / "c.csv")


def test_a_folder_source_takes_the_table_and_a_fold_and_keys_its_cache_on_the_table(tmp_path):
    from cnnpipe.config import load_config
    from cnnpipe.datasets.sources import load_dataset

    src = tmp_path / "images"
    files = sorted(folder(src, 12))
    table = tmp_path / "t.tsv"
    table.write_text("image\ty\n" + "".join(f"{rel}\t{'ab'[i % 2]}\n" for i, rel in enumerate(files)))
    keys = ["data.source=folder", f"data.path={src}", f"data.labels={table}", "data.label_col=y", "data.size=[5,6]",
            "data.folds=3", f"data.cache_dir={tmp_path / 'cache'}"]
    ds = load_dataset(load_config(None, [*keys, "data.fold=2"]).data)
    assert ds.classes == ["a", "b"] and (len(ds.train), len(ds.val)) == (8, 4)
    assert ds.description.startswith(f"folder {src}, validating on fold 2 (cache ")
    caches = list((tmp_path / "cache" / "folders").iterdir())
    table.write_text("image\ty\n" + "".join(f"{rel}\t{'ba'[i % 2]}\n" for i, rel in enumerate(files)))
    load_dataset(load_config(None, [*keys, "data.fold=0"]).data)   # new labels: a new cache, not the old one
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == len(caches) + 1
    with pytest.raises(ValueError, match=r"data.path_col: only used with data.labels"):
        load_dataset(load_config(None, ["data.source=folder", f"data.path={src}", "data.path_col=x"]).data)


def test_what_users_write_semicolons_utf16_unnamed_columns_ids_in_subfolders_negative_folds(tmp_path):
    src = tmp_path / "images"
    files = sorted(folder(src, 8))   # sub/img00.png and sub/img04.png are in a subfolder
    ids = [rel.rsplit("/", 1)[-1][:-4] for rel in files]   # "img00": an id, whatever the folder
    body = "".join(f"{i};{'ab'[n % 2]};{n % 3 - 1};;\r\n" for n, i in enumerate(ids))
    (tmp_path / "eu.csv").write_text("id;label;fold;;\r\n" + body)   # European Excel: ';', two unnamed columns
    (tmp_path / "u16.csv").write_bytes(("id,label\r\n" + "".join(f"{i},{'ab'[n % 2]}\r\n" for n, i in enumerate(ids)))
                                       .encode("utf-16"))
    store = run(src, tmp_path / "eu", labels=LabelTable(str(tmp_path / "eu.csv"), fold_col="fold"))
    kept = [rel for n, rel in enumerate(files) if n % 3 != 0]   # fold -1 is in no fold: reported, not stored
    assert sorted(store.sources("train")) == kept and store.meta["labels"]["fold_values"] == [0, 1]
    assert {s["kind"] for s in store.report["skipped"]} == {"bad_fold"}
    store = run(src, tmp_path / "u16", labels=tmp_path / "u16.csv", val_fraction=0.0)
    want = sorted(folder(tmp_path / "x", 8).items())
    assert stored(store) == {rel: ("ab"[n % 2], v, "train") for n, (rel, v) in enumerate(want)}


def test_a_table_keeps_train_val_test_folders_and_refuses_contradictions(tmp_path):
    src = tmp_path / "images"
    for split in ("train", "test"):
        for i in range(6):
            png(src / split / f"{i}.png", i)
    (tmp_path / "t.csv").write_text("path,label,p\n" + "".join(f"{s}/{i}.png,{'ab'[i % 2]},g{i}\n"
                                                              for s in ("train", "test") for i in range(6)))
    store = run(src, tmp_path / "s", labels=tmp_path / "t.csv", val_fraction=0.5)
    assert store.sources("test") == [f"test/{i}.png" for i in (0, 2, 4, 1, 3, 5)]   # rows in class order
    # the folders decide, as without a table (the fractions are not used)
    assert store.meta["split"]["method"] == "folders" and store.splits == ["train", "test"]
    assert store.meta["split"]["val_fraction"] is None
    assert all(p.startswith("train/") for p in store.sources("train"))
    from cnnpipe.datasets.splits import SplitError, split_files
    with pytest.raises(SplitError, match=r"'stratified' would put one group's files in two splits"):
        split_files(["a", "b"], ["x", "y"], method="stratified", val_fraction=0.5, test_fraction=0.0, seed=0,
                    groups=["g", "g"])


def test_a_group_hold_out_never_takes_a_whole_class_and_hash_moves_whole_groups(tmp_path):
    from cnnpipe.datasets.splits import group_split, split_files

    keys = [f"{i}.png" for i in range(40)]
    labels = ["rare"] * 6 + ["common"] * 34
    groups = ["pX"] * 6 + [f"p{i % 9}" for i in range(34)]
    for seed in range(8):
        splits = group_split(keys, labels, groups, 0.2, 0.0, seed)
        assert "train" in {s for s, label in zip(splits, labels) if label == "rare"}
        hashed, _ = split_files(keys, labels, method="hash", val_fraction=0.3, test_fraction=0.0, seed=seed,
                                groups=groups)
        assert all(len({s for s, g in zip(hashed, groups) if g == grp}) == 1 for grp in set(groups))


def test_hf_metadata_takes_the_column_options_and_reports_sort_naturally(tmp_path, capsys):
    src = tmp_path / "images"
    files = sorted(folder(src, 30))
    (src / "metadata.csv").write_text("file_name,species\n" + "".join(f"{rel},{'ab'[i % 2]}\n"
                                                                      for i, rel in enumerate(files)) + "gone.png,a\n"
                                      + "".join(f"gone{i}.png,a\n" for i in range(12)))
    status, _, err = cli(["preprocess", src, tmp_path / "s", "--size", "4", "--label-col", "species", "--workers", "1"],
                         capsys)
    assert status == 1, err
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == [f"metadata.csv row {n}" for n in range(32, 45)]
    (src / "metadata.jsonl").write_text('{"file_name": "img01.png", "label": "a"}\n')
    with pytest.raises(TableError, match=r"holds metadata.csv and metadata.jsonl; keep one"):
        run(src, tmp_path / "s3")


def test_a_key_the_source_does_not_read_is_an_error():
    from cnnpipe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.fold: only used with data.source store or folder \(data.source is "
                                          r"'shapes'\)"):
        load_config(None, ["data.fold=0"])
    with pytest.raises(ConfigError, match=r"data.labels: only used with data.source folder"):
        load_config(None, ["data.source=store", "data.labels=t.csv"])


def test_csv_rows_are_numbered_as_a_spreadsheet_numbers_them(tmp_path):
    # a quoted newline stays in its cell and a blank line is a row, as Excel shows them
    (tmp_path / "a.csv").write_bytes(b'id,label\r\n"x\r\ny",a\r\n\r\nz,b\r\nw,b,extra\r\n')
    with pytest.raises(TableError, match=r"a.csv row 5: expected 2 columns \(','-separated\), got 3"):
        read_table(tmp_path / "a.csv")
    (tmp_path / "a.csv").write_bytes(b'id,label\r\n"x\r\ny",a\r\n\r\nz,b\r\n')
    t = read_table(tmp_path / "a.csv")
    assert t.columns == {"id": ["x\r\ny", "z"], "label": ["a", "b"]} and t.row_names == ["row 2", "row 4"]
    (tmp_path / "b.csv").write_bytes(b"PK\x03\x04\x00\x00binary")   # an .xlsx renamed .csv
    with pytest.raises(TableError, match=r"b.csv: the table has no rows \(columns: PK"):
        read_table(tmp_path / "b.csv")


def test_second_review_one_file_two_spellings_kaggle_test_folder_folds_and_groups(tmp_path):
    src = tmp_path / "images"
    files = sorted(folder(src, 12))
    (src / "img01.txt").write_text("notes")   # the id img01 means the image
    rows = [f"{src / rel if i % 2 else rel},{'ab'[i % 2]},{i % 3}.0,p{i % 4}" for i, rel in enumerate(files)]
    rows.append(f"{src / 'img02.png'},b,0,p0")   # img02.png again, absolutely named, another label
    (tmp_path / "t.csv").write_text("path,label,fold,patient\n" + "\n".join(rows) + "\nimg01,a,0,p1\n")
    store = run(src, tmp_path / "s", labels=LabelTable(str(tmp_path / "t.csv"), fold_col="fold", group_col="patient"))
    kinds = {s["path"]: s["kind"] for s in store.report["skipped"]}
    # img02.png (rows 3, 14: a relative and an absolute name) and img01 (rows 2, 15: the id; another group)
    assert kinds == {"t.csv row 2": "conflicting_labels", "t.csv row 3": "conflicting_labels",
                     "t.csv row 14": "conflicting_labels", "t.csv row 15": "conflicting_labels", "img01.txt": "no_row"}
    assert store.meta["labels"]["fold_values"] == [0, 1, 2] and store.report["groups_in_two_folds"]
    # SRC/train/ labelled, SRC/test/ unlabelled (Kaggle): the validation split is drawn from train
    kaggle = tmp_path / "kaggle"
    for i in range(8):
        png(kaggle / "train" / f"{i}.png", i)
        png(kaggle / "test" / f"{i}.png", i)
    (tmp_path / "k.csv").write_text("id,label\n" + "".join(f"train/{i},{'ab'[i % 2]}\n" for i in range(8)))
    store = run(kaggle, tmp_path / "k", labels=tmp_path / "k.csv", val_fraction=0.25)
    assert store.splits == ["train", "val"] and store.count("val") == 2


def test_a_group_hold_out_is_near_the_fraction_with_uneven_groups():
    from cnnpipe.datasets.splits import group_split

    sizes = (30, 18, 12, 10, 8, 6, 5, 3)   # eight patients, each with both classes
    groups = [f"p{g}" for g, n in enumerate(sizes) for _ in range(n)]
    labels = ["ab"[i % 2] for i in range(len(groups))]
    keys = [f"{i}.png" for i in range(len(groups))]
    for fraction in (0.1, 0.2):
        held = group_split(keys, labels, groups, fraction, 0.0, 0).count("val")
        assert abs(held - fraction * len(keys)) <= 3, (fraction, held)   # not the 30-image patient


def test_excel_headers_blank_lines_sep_line_and_spaces(tmp_path):
    (tmp_path / "h.csv").write_text("\n\nsep=;\nid ; Label\na;x\n")
    t = read_table(tmp_path / "h.csv")
    assert t.columns == {"id": ["a"], "Label": ["x"]} and t.row_names == ["row 5"]
    from cnnpipe.datasets.tables import pick_column
    with pytest.raises(TableError, match=r"did you mean --label-col 'Label'\?"):
        pick_column(t, None, "--label-col", ("label",))


def test_a_config_s_column_errors_name_the_config_key(tmp_path):
    from cnnpipe.config import load_config
    from cnnpipe.datasets.sources import load_dataset

    src = tmp_path / "images"
    folder(src, 4)
    (tmp_path / "t.csv").write_text("path,label\nimg01.png,a\nimg02.png,b\n")
    cfg = load_config(None, ["data.source=folder", f"data.path={src}", f"data.labels={tmp_path / 't.csv'}",
                             "data.label_col=lbl", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(TableError, match=r"data.label_col 'lbl': no such column \(columns: path, label\); did you "
                                         r"mean 'label'\?"):
        load_dataset(cfg.data)


def test_a_windows_excel_cp1252_table_names_utf8_files_and_keeps_accented_labels(tmp_path):
    src = tmp_path / "images"
    png(src / "café_3.png", 30)
    png(src / LATIN1, 40)   # raw Latin-1 bytes on disk: matched byte for byte first
    png(src / "plain.png", 50)
    (tmp_path / "t.csv").write_bytes(b"file_name,label\r\ncaf\xe9_3.png,oiseau sp\xe9cial\r\ncaf\xe9.png,chat\r\n"
                                     b"plain.png,chat\r\n")
    store = run(src, tmp_path / "s", labels=tmp_path / "t.csv", val_fraction=0.0)
    assert store.classes == ["chat", "oiseau spécial"] and store.report["skipped"] == []
    assert stored(store) == {"café_3.png": ("oiseau spécial", 30, "train"), "caf\\xe9.png": ("chat", 40, "train"),
                             "plain.png": ("chat", 50, "train")}
