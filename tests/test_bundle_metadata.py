"""Every bundle's model-zoo files: metadata.json against MONAI's schema (offline), eval_metrics, large_files.yml."""

import hashlib
import json
import re
import subprocess
import sys

import pytest
import yaml
from bundle_utils import BUNDLES, REPO, SCHEMA
from monai.bundle import verify_metadata

NAMES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/metadata.json"))
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # MONAI-extra-test-data release 0.8.1, meta_schema_20240725.json


def metadata(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))


def test_every_bundle_is_checked():
    assert NAMES == ["classification_2d", "classification_3d", "segmentation_2d", "segmentation_3d"]


def test_the_shipped_schema_is_monais_and_the_one_metadata_names():
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5  # a verbatim copy, not an edited one
    for bundle in NAMES:
        assert metadata(bundle)["schema"].endswith("/" + SCHEMA.name), bundle


@pytest.mark.parametrize("bundle", NAMES)
def test_metadata_is_valid_offline(bundle):
    # the schema file exists, so MONAI reads it instead of downloading the URL in metadata["schema"]
    verify_metadata(
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5
    )


def test_a_metadata_error_is_caught(tmp_path):
    broken = {k: v for k, v in metadata("segmentation_2d").items() if k != "network_data_format"}
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)


VERIFY = "python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath ../" + SCHEMA.name


def test_verify_metadata_command_runs_offline_as_documented():
    """The command of every bundle README, run from a bundle folder: the schema file is found, nothing is fetched."""
    for bundle in NAMES:
        assert VERIFY in (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8"), bundle
    result = subprocess.run(
        [sys.executable, *VERIFY.split()[1:]],
        cwd=BUNDLES / "segmentation_2d",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        env={"PATH": "", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"},  # no network
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_jsonschema_is_installed_by_the_ci_environment():
    """verify_metadata needs jsonschema: the dev extra that .ci/run installs (README's second command) declares it."""
    dev = re.search(r"^dev = \[(.*?)\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M | re.S).group(1)
    assert re.search(r'"jsonschema[>=<~!\s\d.,]*"', dev), dev
    assert 'pip install -e ".[dev]"' in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("bundle", NAMES)
def test_eval_metrics_are_the_measured_student_scores(bundle):
    metrics = metadata(bundle)["eval_metrics"]
    assert metrics and all(isinstance(v, float) and 0 < v <= 1 for v in metrics.values()), metrics
    kinds = ("mean_dice",) if bundle.startswith("segmentation") else ("auc", "accuracy")
    assert set(metrics) == {f"{kind}_{student}" for kind in kinds for student in ("sp", "sf")}


@pytest.mark.parametrize("bundle", NAMES)
def test_large_files_name_the_deployed_weights(bundle):
    listed = yaml.safe_load((BUNDLES / bundle / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
    assert [f["path"] for f in listed] == ["models/model.pt"]
    for entry in listed:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        if entry["url"]:  # published: a download address and the file's hash
            assert entry["url"].startswith("https://") and re.fullmatch(r"[0-9a-f]{32,64}", entry["hash_val"])
        else:  # not published yet: no hash of a file nobody can download
            assert entry["hash_val"] == ""


@pytest.mark.parametrize("path", sorted(BUNDLES.glob("*/configs/*")) + sorted(BUNDLES.glob("*/source/*")), ids=str)
def test_bundle_files_are_ascii_as_monai_reads_them_with_the_platform_encoding(path):
    """MONAI opens config and metadata files without an encoding: under an ASCII locale (a bare container, or after
    reading DICOM through ITK) a non-ASCII character stops every stage with a UnicodeDecodeError."""
    data = path.read_bytes()
    assert data.isascii(), f"{path}: non-ASCII at byte {next(i for i, c in enumerate(data) if c > 127)}"
