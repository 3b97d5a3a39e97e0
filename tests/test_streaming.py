"""fineweb.py's default path, streaming through `datasets`, run for real on a local folder laid out as
FineWeb-Edu is on the Hub (parquet files with a `text` column, a README declaring the sample-10BT
config), with the Hub switched off: its shards must equal those made from the same files with --input."""

import json
import os

import pytest
from conftest import run_script

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def fineweb_folder(tmp_path):
    folder = tmp_path / "fineweb-edu"
    (folder / "sample" / "10BT").mkdir(parents=True)
    docs = [f"Document {i}: " + "a few words, " * (i % 40) + "Ünïcödé 🙂\n\n  end" for i in range(400)]
    for k in range(2):  # two files, so the stream crosses a file boundary
        part = docs[k * 200 : (k + 1) * 200]
        table = pa.table({"text": part, "id": [f"<urn:{k}:{i}>" for i in range(len(part))]})
        pq.write_table(table, folder / "sample" / "10BT" / f"00{k}_00000.parquet", row_group_size=64)
    (folder / "README.md").write_text(README)
    return folder


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".npy"}


@pytest.mark.slow
def test_streaming_a_local_dataset_folder_equals_tokenizing_its_files(fineweb_folder, tmp_path):
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    streamed, local = tmp_path / "streamed", tmp_path / "local"
    r = run_script("fineweb.py", "--dataset", str(fineweb_folder), "--name", "sample-10BT",
                   "--output-dir", str(streamed), "--shard-size", "3000", "--workers", "1", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = sorted(str(p) for p in (fineweb_folder / "sample" / "10BT").iterdir())
    r = run_script(
        "fineweb.py", "--input", *files, "--output-dir", str(local), "--shard-size", "3000", "--workers", "1"
    )
    assert r.returncode == 0, r.stderr
    got, expected = shard_bytes(streamed), shard_bytes(local)
    assert len(expected) >= 4 and got == expected  # several shards, byte for byte
    manifest = json.loads((streamed / "edufineweb_manifest.json").read_text())
    assert manifest["complete"] and manifest["args"]["dataset"] == str(fineweb_folder)
    assert manifest["shards"][-1]["documents"] == 400

    # a killed streaming run resumes after its last complete shard (datasets' skip), byte for byte
    kept = manifest["shards"][:2]
    for shard in manifest["shards"][2:]:
        os.remove(streamed / shard["file"])
    manifest.update(shards=kept, complete=False)
    (streamed / "edufineweb_manifest.json").write_text(json.dumps(manifest))
    r = run_script("fineweb.py", "--dataset", str(fineweb_folder), "--name", "sample-10BT",
                   "--output-dir", str(streamed), "--shard-size", "3000", "--workers", "1", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"resuming after shard 1 ({kept[-1]['documents']:,} documents done)" in r.stderr
    assert shard_bytes(streamed) == expected


@pytest.mark.slow
def test_an_unreachable_dataset_is_one_line(tmp_path):
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "out"
    r = run_script("fineweb.py", "--output-dir", str(out), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot stream HuggingFaceFW/fineweb-edu name=sample-10BT (")
    assert r.stderr.endswith("); check the network, or tokenize local files with --input FILE...\n")
    assert len(r.stderr.splitlines()) == 1 and not out.exists()
