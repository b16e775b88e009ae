"""Tests of the validate stage: the suite runs through real Great Expectations on tiny manifests."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dicomflow.config import layout
from dicomflow.errors import DataError
from dicomflow.quality.expectations import (
    CRITICAL, PHI_VALUE_PATTERNS, WARNING, build_checks, drift_results, find_phi_columns, find_text_columns,
    profile_manifest,
)
from dicomflow.config.params import load_params
from dicomflow.quality.report import format_failures, render_report, run_checks, summarise
from stages.validate import main

PARAMS = {
    "classes": [0, 1], "modalities": ["CR", "DX"], "min_class_fraction": 0.2,
    "min_image_std": 0.02, "max_extreme_share": 0.5, "image_size_range": [64, 4096],
    "pixel_spacing_range": [0.05, 5.0],
}


def make_manifest(n: int = 20) -> pd.DataFrame:
    """A clean de-identified manifest: labels alternate 0/1, every value in range."""
    return pd.DataFrame({
        "image_key": [f"img{i:03d}" for i in range(n)],
        "patient_key": [f"pat{i // 2:03d}" for i in range(n)],
        "study_key": [f"stu{i // 2:03d}" for i in range(n)],
        "label": [i % 2 for i in range(n)],
        "modality": ["CR" if i % 3 else "DX" for i in range(n)],
        "manufacturer": "ACME", "body_part": "BREAST", "view_position": "CC", "patient_sex": "F",
        "patient_age_years": [40 + i for i in range(n)],
        "rows": 512, "columns": [256 + i for i in range(n)], "pixel_spacing_mm": 0.1,
        "bits_stored": 12, "photometric": "MONOCHROME2", "predefined_split": "",
        "pixel_min": 0.0, "pixel_max": 1.0, "pixel_mean": 0.4, "pixel_std": 0.15,
        "pixel_extreme_share": 0.01, "source_channels": 1, "pixel_colour_spread": float("nan"),
        "colour_profile": "",
        "pixel_sha256": [f"{i:064x}" for i in range(n)],
        "dicom_file": [f"dicom/img{i:03d}.dcm" for i in range(n)],
    })


def validate(manifest: pd.DataFrame) -> dict:
    checks = build_checks(**PARAMS, text_columns=find_text_columns(manifest))
    return {r.check.name: r for r in run_checks(manifest, checks)}


def failures(results: dict) -> dict:
    return {name: r for name, r in results.items() if r.failed}


class TestBuildChecks:
    def test_names_are_unique_and_severities_known(self):
        checks = build_checks(**PARAMS, text_columns=["image_key", "modality"])
        assert len({c.name for c in checks}) == len(checks)
        assert {c.severity for c in checks} == {CRITICAL, WARNING}
        assert {c.name for c in checks if c.severity == WARNING} == {
            "image_not_blank", "image_not_saturated", "pixel_hash_unique"}


class TestPhiDetection:
    def test_no_manifest_column_is_flagged(self):
        assert find_phi_columns(make_manifest()) == []

    @pytest.mark.parametrize("name", [
        "patient_id", "PatientName", "PatientBirthDate", "accession_number", "AccessionNumber",
        "study_instance_uid", "SOPInstanceUID", "institution_name", "ReferringPhysicianName",
        "patients_address", "study_date", "source_path", "other_patient_ids",
    ])
    def test_identifying_column_names_are_flagged(self, name):
        manifest = make_manifest().assign(**{name: "x"})
        assert find_phi_columns(manifest) == [name]

    def test_datetime_column_is_flagged_whatever_its_name(self):
        manifest = make_manifest().assign(acquired=pd.Timestamp("2024-01-31"))
        assert find_phi_columns(manifest) == ["acquired"]

    @pytest.mark.parametrize("value", [
        "1.2.840.113619.2.55.3.604688119", "1.2.3.4", "20240131", "20240131101500",
        "2024-01-31", "DOE^JANE", "O'Brien^Mary^^Dr",
    ])
    def test_identifying_values_match_a_pattern(self, value):
        assert any(re.search(p, value) for p in PHI_VALUE_PATTERNS)

    @pytest.mark.parametrize("value", [
        "img001", "f" * 64, "0" * 64, "MONOCHROME2", "CR", "dicom/img001.dcm", "1.2.3", "2024",
        "20241399", "2.25.123456789",  # a UUID-derived UID has 3 components: new, not identifying
    ])
    def test_ordinary_values_match_no_pattern(self, value):
        assert not any(re.search(p, value) for p in PHI_VALUE_PATTERNS)


class TestRunChecks:
    def test_clean_manifest_passes_every_expectation(self):
        results = validate(make_manifest())
        assert failures(results) == {}
        assert all(r.status == "passed" for r in results.values())
        assert summarise(list(results.values()), n_rows=20)["success"] == 1

    def _set(self, manifest, row, column, value):
        manifest[column] = manifest[column].astype(object)
        manifest.loc[row, column] = value
        return manifest

    @pytest.mark.parametrize("column, row, value, name, severity, count, examples", [
        ("label", 2, None, "label_not_null", CRITICAL, 1, ("img002",)),
        ("image_key", 4, "img001", "image_key_unique", CRITICAL, 2, ("img001",)),
        ("label", 3, 7, "label_in_classes", CRITICAL, 1, ("img003",)),
        ("modality", 5, "CT", "modality_allowed", CRITICAL, 1, ("img005",)),
        ("rows", 6, 32, "rows_in_range", CRITICAL, 1, ("img006",)),
        ("pixel_spacing_mm", 7, 0.0, "pixel_spacing_in_range", CRITICAL, 1, ("img007",)),
        ("pixel_spacing_mm", 3, 9.5, "pixel_spacing_in_range", CRITICAL, 1, ("img003",)),
        ("pixel_std", 5, 0.0, "image_not_blank", WARNING, 1, ("img005",)),
        ("pixel_extreme_share", 8, 0.8, "image_not_saturated", WARNING, 1, ("img008",)),
        ("pixel_sha256", 7, f"{6:064x}", "pixel_hash_unique", WARNING, 2, ("img006", "img007")),
        ("body_part", 9, "1.2.840.113619.2.55.3", "no_phi_values_body_part", CRITICAL, 1, ("img009",)),
        ("view_position", 9, "20240131", "no_phi_values_view_position", CRITICAL, 1, ("img009",)),
        ("manufacturer", 1, "2024-01-31", "no_phi_values_manufacturer", CRITICAL, 1, ("img001",)),
        ("study_key", 9, "DOE^JANE", "no_phi_values_study_key", CRITICAL, 1, ("img009",)),
    ])
    @pytest.mark.slow
    def test_one_defect_fails_exactly_its_expectation(
        self, column, row, value, name, severity, count, examples
    ):
        failed = failures(validate(self._set(make_manifest(), row, column, value)))
        assert list(failed) == [name]
        assert failed[name].check.severity == severity
        assert failed[name].unexpected_count == count
        assert failed[name].examples == examples

    def test_null_image_key_is_shown_by_row_number(self):
        failed = failures(validate(self._set(make_manifest(), 3, "image_key", None)))
        assert list(failed) == ["image_key_not_null"]
        assert failed["image_key_not_null"].examples == ("row 3",)

    def test_class_below_minimum_share(self):
        manifest = make_manifest().assign(label=[1] * 3 + [0] * 17)  # 15% < 20%
        failed = failures(validate(manifest))
        assert list(failed) == ["class_share_1"]
        assert failed["class_share_1"].check.severity == CRITICAL
        assert failed["class_share_1"].unexpected_count == 3
        assert "3 of 20 labelled rows (15.0%); minimum 20.0%" in failed["class_share_1"].detail

    def test_phi_named_column(self):
        failed = failures(validate(make_manifest().assign(PatientBirthDate=19700101)))
        assert list(failed) == ["no_phi_columns"]
        assert failed["no_phi_columns"].check.severity == CRITICAL
        assert failed["no_phi_columns"].unexpected_count == 1
        assert failed["no_phi_columns"].detail == "columns: PatientBirthDate"

    def test_missing_required_column(self):
        failed = failures(validate(make_manifest().drop(columns="manufacturer")))
        assert list(failed) == ["columns_present"]
        assert failed["columns_present"].unexpected_count == 1
        assert failed["columns_present"].detail == "missing columns: manufacturer"

    def test_empty_manifest(self):
        failed = failures(validate(make_manifest().iloc[:0]))
        assert list(failed) == ["manifest_not_empty"]
        assert failed["manifest_not_empty"].detail == "0 rows"

    def test_wrong_column_type_fails_the_schema_and_its_range_check(self):
        failed = failures(validate(make_manifest().astype({"rows": str})))
        assert list(failed) == ["column_types", "rows_in_range"]
        assert failed["column_types"].detail == "columns: rows (str, expected integer)"
        assert failed["rows_in_range"].detail.startswith("could not run: Column values, min_value")

    @pytest.mark.parametrize("column, values, expected", [
        ("label", ["0", "1"] * 10, "label (str, expected integer)"),
        ("label", [0.5, 1.0] * 10, "label (float64, expected integer)"),
        ("pixel_std", [True, False] * 10, "pixel_std (bool, expected float)"),
        ("image_key", list(range(20)), "image_key (int64, expected string)"),
    ])
    def test_column_of_the_wrong_kind(self, column, values, expected):
        failed = failures(validate(make_manifest().assign(**{column: values})))
        assert "column_types" in failed
        assert failed["column_types"].detail == f"columns: {expected}"

    def test_integers_with_gaps_are_still_integers(self):
        manifest = make_manifest().assign(patient_age_years=[40.0, None] * 10, label=[0, 1, None, 1] * 5)
        assert "column_types" not in failures(validate(manifest))

    def test_checks_on_a_missing_column_are_skipped(self):
        results = validate(make_manifest().drop(columns="label"))
        assert list(failures(results)) == ["columns_present"]
        skipped = {name for name, r in results.items() if r.status == "skipped"}
        assert skipped == {"label_not_null", "label_in_classes", "class_share_0", "class_share_1"}
        assert summarise(list(results.values()), n_rows=20)["skipped"] == 4


@pytest.mark.slow
class TestSeries:
    """ingest.unit: series: rows are CT series, with the diagnosis columns ingest wrote."""

    @staticmethod
    def series_manifest(n: int = 20) -> pd.DataFrame:
        # In-plane, the source slices (64 x 64 at 5 mm, as the CT sample's); 32-40 slices 5 mm apart.
        return make_manifest(n).assign(
            modality="CT", rows=64, columns=64, pixel_spacing_mm=5.0,
            series_files=[32 + i % 9 for i in range(n)], series_positions=[32 + i % 9 for i in range(n)],
            series_missing=0, series_duplicates_identical=0, series_duplicates_differing=0,
            series_spacing_mm=5.0, series_spacing_deviation_mm=0.0, series_orientation_deviation_deg=0.0,
            series_filled=0)

    @staticmethod
    def validate(manifest: pd.DataFrame) -> dict:
        checks = build_checks(**{**PARAMS, "modalities": ["CT"]}, text_columns=find_text_columns(manifest),
                              volumes=True, slice_count_range=(8, 2000), slice_spacing_range=(0.3, 10.0),
                              max_orientation_deviation_deg=0.0)
        return {r.check.name: r for r in run_checks(manifest, checks)}

    def test_clean_series_pass_every_expectation_series_ones_included(self):
        results = self.validate(self.series_manifest())
        assert failures(results) == {}
        assert {"slice_count_in_range", "slice_spacing_in_range", "orientation_consistent"} <= set(results)

    @pytest.mark.parametrize("column, value, name", [
        ("series_positions", 5, "slice_count_in_range"),
        ("series_spacing_mm", 12.5, "slice_spacing_in_range"),
        ("series_orientation_deviation_deg", 0.05, "orientation_consistent"),
        ("series_spacing_mm", None, "series_spacing_mm_not_null"),
    ])
    def test_one_bad_series_fails_exactly_its_expectation(self, column, value, name):
        manifest = self.series_manifest()
        manifest[column] = manifest[column].astype(object)
        manifest.loc[4, column] = value
        failed = failures(self.validate(manifest))
        assert list(failed) == [name]
        assert failed[name].check.severity == CRITICAL and failed[name].examples == ("img004",)

    def test_series_columns_are_required_for_volumes_only(self):
        images = make_manifest()
        assert not set(layout.SERIES_SCHEMA) & set(images.columns)
        assert failures(validate(images)) == {}
        assert list(failures(self.validate(images.assign(modality="CT")))) == ["columns_present"]


DRIFT_LIMITS = {"max_label_change": 0.1, "max_mix_change": 0.2, "max_intensity_shift": 1.0}


def drift(current: pd.DataFrame, reference: pd.DataFrame | None) -> dict:
    ref = None if reference is None else profile_manifest(reference)
    return {r.check.name: r for r in drift_results(profile_manifest(current), ref, **DRIFT_LIMITS)}


class TestDrift:
    def test_profile_holds_shares_and_moments_only(self):
        profile = profile_manifest(make_manifest())
        assert profile["shares"]["label"] == {"0": 0.5, "1": 0.5}
        assert profile["shares"]["modality"] == {"CR": 0.65, "DX": 0.35}
        assert profile["intensity"]["pixel_mean"] == {"mean": 0.4, "std": 0.0}
        assert "img000" not in json.dumps(profile) and "pat000" not in json.dumps(profile)

    def test_first_accepted_set_skips_every_drift_check(self):
        results = drift(make_manifest(), None)
        assert {r.status for r in results.values()} == {"skipped"}
        assert set(results) == {"drift_label_share", "drift_modality_mix", "drift_manufacturer_mix",
                                "drift_intensity"}

    def test_same_data_does_not_drift(self):
        assert {r.status for r in drift(make_manifest(), make_manifest()).values()} == {"passed"}

    def test_label_shares_moving_beyond_the_threshold_warn(self):
        shifted = make_manifest().assign(label=[1] * 4 + [0] * 16)  # 50/50 -> 80/20
        results = drift(shifted, make_manifest())
        failed = failures(results)
        assert list(failed) == ["drift_label_share"]
        assert failed["drift_label_share"].check.severity == WARNING
        assert failed["drift_label_share"].unexpected_count == 2
        assert failed["drift_label_share"].detail == "0: 50.0% -> 80.0%; 1: 50.0% -> 20.0%"

    def test_small_moves_stay_within_thresholds(self):
        nudged = make_manifest().assign(label=[1] * 9 + [0] * 11)  # 5 points
        assert failures(drift(nudged, make_manifest())) == {}

    def test_new_scanner_with_inverted_intensities_warns(self):
        reference = make_manifest().assign(pixel_mean=[0.30 + 0.01 * (i % 5) for i in range(20)])
        new_scanner = reference.assign(manufacturer="NEWCO", pixel_mean=1 - reference["pixel_mean"])
        failed = failures(drift(new_scanner, reference))
        assert list(failed) == ["drift_manufacturer_mix", "drift_intensity"]
        assert failed["drift_manufacturer_mix"].detail == "ACME: 100.0% -> 0.0%; NEWCO: 0.0% -> 100.0%"
        assert failed["drift_intensity"].unexpected_count == 1
        assert failed["drift_intensity"].detail.startswith("pixel_mean: mean 0.320 -> 0.680 (")


class TestReporting:
    @pytest.fixture(scope="class")
    def results(self):
        manifest = make_manifest()
        manifest.loc[2, "modality"] = "CT"
        manifest.loc[4, "pixel_std"] = 0.0
        manifest.loc[6, "image_key"] = "<script>alert(1)</script>"
        manifest.loc[6, "rows"] = 10_000
        return run_checks(manifest, build_checks(**PARAMS, text_columns=find_text_columns(manifest)))

    def test_summary_counts_by_severity(self, results):
        summary = summarise(results, n_rows=20)
        assert summary == {
            "n_rows": 20, "expectations": len(results), "passed": len(results) - 3,
            "failed_critical": 2, "failed_warning": 1, "skipped": 0, "success": 0,
        }

    def test_failure_message_has_one_line_per_critical_failure(self, results):
        lines = format_failures(results).splitlines()
        assert lines == [
            "modality_allowed (expect_column_values_to_be_in_set), column modality: "
            "1 of 20 rows; e.g. img002",
            "rows_in_range (expect_column_values_to_be_between), column rows: "
            "1 of 20 rows; e.g. <script>alert(1)</script>",
        ]
        assert format_failures(results, severity=WARNING).startswith("image_not_blank ")

    def test_report_is_self_contained_escaped_and_complete(self, results):
        page = render_report(results, n_rows=20, source="outputs/deidentify/manifest.parquet")
        assert "<link" not in page and "<script" not in page
        assert "http://" not in page and "https://" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<style>" in page
        for r in results:
            assert f"<td>{r.check.name}</td>" in page
        assert page.count('<tr class="failed critical">') == 2
        assert page.count('<tr class="failed warning">') == 1


class TestMain:
    @pytest.fixture
    def project(self, tmp_path, monkeypatch, repo_params_file):
        shutil.copy(repo_params_file, tmp_path / "params.yaml")
        monkeypatch.chdir(tmp_path)
        paths = load_params("paths")
        out = Path(paths.deid_dir)
        out.mkdir(parents=True)

        def write(manifest: pd.DataFrame) -> None:
            manifest.to_parquet(out / layout.DEID_MANIFEST, index=False)
        return paths, write

    def test_warning_only_defect_finishes_and_logs(self, project, caplog):
        paths, write = project
        manifest = make_manifest()
        manifest.loc[5, "pixel_std"] = 0.001
        write(manifest)
        with caplog.at_level(logging.INFO, logger="stages.validate"):
            main()
        metrics = json.loads(Path(paths.validation_metrics).read_text())
        assert metrics["success"] == 1 and metrics["failed_warning"] == 1
        assert metrics["failed_critical"] == 0 and metrics["n_rows"] == 20
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ["image_not_blank (expect_column_values_to_be_between), "
                            "column pixel_std: 1 of 20 rows; e.g. img005"]
        assert "image_not_blank" in Path(paths.validation_report).read_text()

    def test_critical_defect_writes_outputs_then_raises(self, project):
        paths, write = project
        manifest = make_manifest()
        manifest.loc[3, "label"] = 7
        manifest["patient_name"] = "DOE^JANE"
        write(manifest)
        with pytest.raises(DataError, match=r"3 critical expectation\(s\) failed") as err:
            main()
        lines = str(err.value).splitlines()[1:]
        assert [line.split(" ")[0] for line in lines] == [
            "label_in_classes", "no_phi_columns", "no_phi_values_patient_name"]
        assert json.loads(Path(paths.validation_metrics).read_text())["success"] == 0
        assert "label_in_classes" in Path(paths.validation_report).read_text()

    @pytest.mark.slow
    def test_accepted_set_becomes_the_drift_reference_of_the_next(self, project, caplog):
        paths, write = project
        write(make_manifest())
        main()
        first = json.loads(Path(paths.data_profile).read_text())
        assert first["shares"]["label"] == {"0": 0.5, "1": 0.5}

        write(make_manifest().assign(label=[1] * 4 + [0] * 16))
        with caplog.at_level(logging.WARNING, logger="stages.validate"):
            main()
        assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["drift_label_share"]
        metrics = json.loads(Path(paths.validation_metrics).read_text())
        assert metrics["success"] == 1 and metrics["failed_warning"] == 1
        second = json.loads(Path(paths.data_profile).read_text())
        assert second["shares"]["label"] == {"0": 0.8, "1": 0.2}

        rejected = make_manifest()
        rejected.loc[0, "modality"] = "CT"
        write(rejected)
        with pytest.raises(DataError):
            main()
        assert json.loads(Path(paths.data_profile).read_text()) == second

    def test_missing_manifest_names_the_file(self, project):
        with pytest.raises(DataError, match=r"manifest.parquet not found; run the deidentify"):
            main()


@pytest.mark.parametrize("module", ["ingest", "deidentify", "validate", "split", "augment", "train",
                                    "evaluate"])
@pytest.mark.slow
def test_importing_a_stage_does_not_import_great_expectations(module):
    # GX costs seconds to import: only validate's suite run may pay it, not module import.
    code = f"import sys, stages.{module}; print('great_expectations' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"
