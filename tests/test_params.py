"""Tests for dicomflow/config/params.py: the repository's params.yaml loads, and every bad value is one line."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from dicomflow.config.params import (
    SECTIONS, VOLUME_ARCHITECTURES, PathsParams, ParamsError, check_architecture, load_params, load_paths,
    read_params_file,
)

_DELETE = object()


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _with(raw: dict, dotted: str, value: object) -> dict:
    """A deep copy of ``raw`` with ``section.key`` set to ``value`` (or removed for _DELETE)."""
    changed = copy.deepcopy(raw)
    section, _, key = dotted.partition(".")
    target = changed if not key else changed[section]
    name = key or section
    if value is _DELETE:
        del target[name]
    else:
        target[name] = value
    return changed


@pytest.fixture
def repo_raw(repo_params_file: Path) -> dict:
    with open(repo_params_file, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


class TestLoadParamsRepoFile:
    @pytest.mark.parametrize("section", list(SECTIONS))
    def test_every_section_of_the_repo_file_loads(self, repo_params_file, repo_raw, section):
        params = load_params(section, path=repo_params_file)

        assert isinstance(params, SECTIONS[section])
        assert {f.name for f in dataclasses.fields(params)} == set(repo_raw[section])
        for name, value in repo_raw[section].items():
            loaded = getattr(params, name)  # a nested section (train.privacy) as the mapping it was read from
            assert (dataclasses.asdict(loaded) if dataclasses.is_dataclass(loaded) else loaded) == value

    def test_sections_are_frozen(self, repo_params_file):
        params = load_params("split", path=repo_params_file)
        with pytest.raises(dataclasses.FrozenInstanceError):
            params.seed = 1  # type: ignore[misc]

    def test_read_params_file_returns_the_plain_mapping(self, repo_params_file, repo_raw):
        assert read_params_file(repo_params_file) == repo_raw


class TestLoadParamsConversions:
    def test_int_for_a_float_key_becomes_a_float(self, tmp_path, repo_raw):
        path = _write(tmp_path, _with(repo_raw, "evaluate.fixed_threshold", 1))

        value = load_params("evaluate", path=path).fixed_threshold

        assert value == 1.0 and type(value) is float

    @pytest.mark.parametrize(
        ("dotted", "value"),
        [
            ("ingest.max_quarantine_fraction", 0.0),  # [0, 1] closed
            ("ingest.max_quarantine_fraction", 1.0),
            ("ingest.image_size", 16),
            ("ingest.image_size", 1024),
            ("train.lr", 1.0),  # (0, 1] closed on the right
            ("ingest.workers", 0),
            ("ingest.workers", 256),
            ("split.seed", -3),  # no range on seeds
        ],
    )
    def test_interval_ends_that_are_allowed_load(self, tmp_path, repo_raw, dotted, value):
        path = _write(tmp_path, _with(repo_raw, dotted, value))
        section, _, key = dotted.partition(".")

        params = load_params(section, path=path)

        assert getattr(params, key) == value


# (change to the repo's params, section to load, pattern the one-line message must match)
BAD_VALUES = [
    pytest.param(
        "split.shuffle", True, "split",
        r"unknown key 'split\.shuffle'; allowed keys: method, val_size, test_size, seed",
        id="unknown-key",
    ),
    pytest.param(
        "train.epochs", _DELETE, "train",
        r"missing key 'train\.epochs' \(an int in \[1, 10000\]\)",
        id="missing-key",
    ),
    pytest.param(
        "train.epochs", "ten", "train",
        r"'train\.epochs' must be an int in \[1, 10000\]; got 'ten'",
        id="str-for-int",
    ),
    pytest.param(
        "split.seed", True, "split",
        r"'split\.seed' must be an int; got True",
        id="bool-for-int",
    ),
    pytest.param(
        "train.batch_size", 32.0, "train",
        r"'train\.batch_size' must be an int in \[1, 65536\]; got 32\.0",
        id="float-for-int",
    ),
    pytest.param(
        "split.test_size", False, "split",
        r"'split\.test_size' must be a float in \(0\.0, 1\.0\); got False",
        id="bool-for-float",
    ),
    pytest.param(
        "deidentify.remove_private_tags", "yes", "deidentify",
        r"'deidentify\.remove_private_tags' must be a bool; got 'yes'",
        id="str-for-bool",
    ),
    pytest.param(
        "deidentify.remove_private_tags", 1, "deidentify",
        r"'deidentify\.remove_private_tags' must be a bool; got 1",
        id="int-for-bool",
    ),
    pytest.param(
        "evaluate.registered_model_name", 3, "evaluate",
        r"'evaluate\.registered_model_name' must be a str; got 3",
        id="int-for-str",
    ),
    pytest.param(
        "split.test_size", 1.5, "split",
        r"'split\.test_size' must be a float in \(0\.0, 1\.0\); got 1\.5",
        id="above-range",
    ),
    pytest.param(
        "split.val_size", 0.0, "split",
        r"'split\.val_size' must be a float in \(0\.0, 1\.0\); got 0\.0",
        id="open-end-of-range",
    ),
    pytest.param(
        "train.lr", 0, "train",
        r"'train\.lr' must be a float in \(0\.0, 1\.0\]; got 0\.0",
        id="open-left-end",
    ),
    pytest.param(
        "split.val_size", 1.5, "split",
        r"'split\.val_size' must be a float in \(0\.0, 1\.0\); got 1\.5",
        id="float-above-open-range",
    ),
    pytest.param(
        "ingest.image_size", 8, "ingest",
        r"'ingest\.image_size' must be an int in \[16, 1024\]; got 8",
        id="int-below-range",
    ),
    pytest.param(
        "augment.noise_std", math.nan, "augment",
        r"'augment\.noise_std' must be a float in \[0\.0, 1\.0\]; got nan",
        id="nan",
    ),
    pytest.param(
        "evaluate.threshold_method", "otsu", "evaluate",
        r"'evaluate\.threshold_method' must be one of 'youden', 'fixed', 'target_sensitivity'; got 'otsu'",
        id="not-in-choices",
    ),
    pytest.param(
        "ingest.label_key", "patient_id", "ingest",
        r"'ingest\.label_key' must be one of 'accession_number', 'study_instance_uid', 'series_instance_uid', "
        r"'sop_instance_uid', 'path'; got 'patient_id'",
        id="label-key-not-in-choices",
    ),
    pytest.param(
        "ingest.classes", [], "ingest",
        r"'ingest\.classes' must be a non-empty list of int; got \[\]",
        id="empty-list",
    ),
    pytest.param(
        "validate.modalities", ["CR", 3], "validate",
        r"'validate\.modalities' must be a non-empty list of str; got \['CR', 3\]",
        id="list-item-wrong-type",
    ),
    pytest.param(
        "ingest.classes", "0,1", "ingest",
        r"'ingest\.classes' must be a non-empty list of int; got '0,1'",
        id="str-for-list",
    ),
    pytest.param(
        "train", _DELETE, "train",
        r"section 'train' is missing or not a mapping",
        id="missing-section",
    ),
    pytest.param(
        "train", 5, "train",
        r"section 'train' is missing or not a mapping",
        id="section-not-a-mapping",
    ),
    pytest.param(
        "validate.pixel_spacing_range", [5.0, 0.05], "validate",
        r"'validate\.pixel_spacing_range' must be \[low, high\] with low <= high; got \[5\.0, 0\.05\]",
        id="inverted-range",
    ),
    pytest.param(
        "validate.drift_max_intensity_shift", -1, "validate",
        r"'validate\.drift_max_intensity_shift' must be a float >= 0\.0; got -1\.0",
        id="negative-threshold",
    ),
    pytest.param(
        "tune", {"trials": 3}, "split",
        r"unknown section 'tune'; allowed sections: ingest, deidentify, validate, split, "
        r"augment, pretrain, train, evaluate",
        id="unknown-section-in-file",
    ),
]


class TestLoadParamsErrors:
    @pytest.mark.parametrize(("dotted", "value", "section", "message"), BAD_VALUES)
    def test_bad_value_is_one_line_naming_key_value_and_allowed(
        self, tmp_path, repo_raw, dotted, value, section, message
    ):
        path = _write(tmp_path, _with(repo_raw, dotted, value))

        with pytest.raises(ParamsError, match=message) as info:
            load_params(section, path=path)

        assert "\n" not in str(info.value)

    def test_unknown_section_name_is_rejected_before_reading(self, tmp_path):
        missing_file = tmp_path / "does-not-exist.yaml"

        with pytest.raises(ParamsError, match=r"unknown params section 'tune'; allowed: paths, ingest, "):
            load_params("tune", path=missing_file)

    def test_file_that_is_not_a_mapping(self, tmp_path):
        path = tmp_path / "params.yaml"
        path.write_text("- just\n- a list\n", encoding="utf-8")

        with pytest.raises(ParamsError, match=re.escape(f"{path}: expected a mapping of sections, got list")):
            load_params("split", path=path)

    def test_params_error_is_a_value_error(self):
        assert issubclass(ParamsError, ValueError)


def test_split_sizes_that_leave_no_training_set_are_rejected(tmp_path, repo_raw):
    raw = _with(_with(repo_raw, "split.val_size", 0.5), "split.test_size", 0.5)
    with pytest.raises(ParamsError, match=r"'split\.val_size' \+ 'split\.test_size' must be below 1.*got 0\.5 \+ 0\.5"):
        load_params("split", path=_write(tmp_path, raw))


def test_a_typo_in_any_section_stops_every_stage(tmp_path, repo_raw):
    """DVC reruns a stage only for the keys it declares: the loader checks them all, every time."""
    path = _write(tmp_path, _with(repo_raw, "split.sed", 7))
    for section in ("ingest", "train", "evaluate"):
        with pytest.raises(ParamsError, match=r"unknown key 'split\.sed'; allowed keys: method, "):
            load_params(section, path)


class TestPaths:
    """File locations are declared once, as dvc.yaml's ``paths`` variables, not among the params."""

    REPO = Path(__file__).resolve().parents[1]

    @staticmethod
    def _pipeline(folder: Path, paths: dict) -> Path:
        (folder / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"paths": paths}], "stages": {}}))
        return folder / "dvc.yaml"

    def test_the_repo_declares_every_location_once_and_dvc_yaml_uses_them(self):
        pipeline = yaml.safe_load((self.REPO / "dvc.yaml").read_text(encoding="utf-8"))
        (declared,) = [item["paths"] for item in pipeline["vars"] if "paths" in item]
        assert dataclasses.asdict(load_paths(self.REPO / "dvc.yaml")) == declared
        code = "".join(line.split("#")[0] for line in (self.REPO / "dvc.yaml").open(encoding="utf-8"))
        used = set(re.findall(r"\$\{paths\.(\w+)\}", code))
        assert used <= set(declared) and "model_dir" in used

    def test_params_yaml_holds_no_location(self, repo_raw):
        assert "paths" not in repo_raw

    def test_load_params_paths_reads_the_dvc_yaml_beside_params_yaml(self, tmp_path, repo_raw):
        _write(tmp_path, repo_raw)
        self._pipeline(tmp_path, {f.name: f"elsewhere/{f.name}" for f in dataclasses.fields(PathsParams)})
        paths = load_params("paths", path=tmp_path / "params.yaml")
        assert paths.model_dir == "elsewhere/model_dir" and paths.data == "elsewhere/data"

    def test_a_folder_without_one_gets_the_checkouts_layout(self, tmp_path, repo_raw):
        _write(tmp_path, repo_raw)
        assert load_params("paths", path=tmp_path / "params.yaml") == load_paths(self.REPO / "dvc.yaml")

    def test_a_paths_section_left_in_params_yaml_is_refused_naming_where_it_goes(self, tmp_path, repo_raw):
        path = _write(tmp_path, {"paths": {"data": "data"}, **repo_raw})
        with pytest.raises(ParamsError, match=r"move the 'paths' section to the 'vars' of dvc\.yaml") as info:
            load_params("train", path=path)
        assert "\n" not in str(info.value)

    def test_a_bad_location_names_dvc_yaml(self, tmp_path):
        path = self._pipeline(tmp_path, {"data": 3})
        with pytest.raises(ParamsError, match=r"^dvc\.yaml: 'paths\.data' must be a str; got 3$"):
            load_paths(path)

    def test_a_pipeline_without_locations_is_one_line(self, tmp_path):
        (tmp_path / "dvc.yaml").write_text("stages: {}\n")
        with pytest.raises(ParamsError, match=r"expected one 'paths' mapping among its 'vars'.*found 0$"):
            load_paths(tmp_path / "dvc.yaml")


@pytest.mark.parametrize("architecture", VOLUME_ARCHITECTURES)
def test_a_volume_network_is_a_choice_and_refused_on_images(tmp_path, repo_raw, architecture):
    raw = _with(repo_raw, "train", {**repo_raw["train"], "architecture": architecture})
    assert load_params("train", path=_write(tmp_path, raw)).architecture == architecture
    assert repo_raw["ingest"]["unit"] == "image"
    expected = (rf"^params.yaml: 'train.architecture' is '{architecture}', a network of volumes, but 'ingest.unit' "
                r"is 'image' \(2-D images\): set ingest.unit: series, or architecture to one of seed_cnn, "
                r"resnet_small, resnet_small_gn$")
    with pytest.raises(ParamsError, match=expected):
        check_architecture(architecture, "image")
    check_architecture(architecture, "series")


def test_an_image_network_is_refused_on_volumes(repo_raw):
    with pytest.raises(ParamsError, match=r"^params.yaml: 'train.architecture' is 'resnet_small', a network of 2-D "
                                          r"images, but 'ingest.unit' is 'series' \(volumes\): set architecture to "
                                          r"one of resnet3d_small, attention_mil, or ingest.unit: image$"):
        check_architecture(repo_raw["train"]["architecture"], "series")
    check_architecture(repo_raw["train"]["architecture"], "image")
