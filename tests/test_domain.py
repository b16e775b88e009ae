"""Tests for dicomflow/serving/domain.py: the training domain from manifest rows, its check on real DICOM
headers (pydicom's test files and files written with make_dicom), and its JSON form.

The registered model refusing such files end to end (pyfunc, dicomflow predict, mlflow models serve)
is tested in tests/test_serving.py, beside the store, model and server it uses.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicomflow.serving.domain import TrainingDomain
from dicomflow.dicom.reading import Quarantined

# A chest radiograph model: what from_manifest makes of MANIFEST below, written out by hand.
CHEST = TrainingDomain(modalities={"CR", "DX"}, photometrics={"MONOCHROME1", "MONOCHROME2"}, channels={1},
                       rows=(256, 2500), columns=(300, 2048), pixel_spacing_mm=(0.1, 0.2), body_parts={"CHEST"})


def _manifest(**columns: list) -> pd.DataFrame:
    """Manifest rows with the de-identified manifest's dtypes (layout.MANIFEST_SCHEMA)."""
    kinds = {"modality": "string", "photometric": "string", "body_part": "string", "rows": "Int64",
             "columns": "Int64", "pixel_spacing_mm": "float64"}
    return pd.DataFrame({name: pd.array(values, dtype=kinds[name]) for name, values in columns.items()})


MANIFEST = _manifest(
    modality=["CR", "DX", "", None, "DX"],
    photometric=["MONOCHROME1", "MONOCHROME2", "MONOCHROME2", None, "MONOCHROME2"],
    rows=[2500, 256, 1024, None, 2000],
    columns=[2048, 300, 1024, 512, None],
    pixel_spacing_mm=[0.2, float("nan"), 0.1, 0.15, float("nan")],
    body_part=["CHEST", "chest ", "", None, "CHEST"],
)


def _header(**attributes: object) -> Dataset:
    """A DICOM header with just ``attributes`` (check reads nothing else)."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _refusal(domain: TrainingDomain, ds: Dataset) -> str:
    with pytest.raises(Quarantined) as caught:
        domain.check(ds)
    assert caught.value.reason == "out_of_domain"
    return str(caught.value)


class TestFromManifest:
    def test_sets_and_ranges_of_the_rows_ignoring_missing_and_empty_values(self):
        domain = TrainingDomain.from_manifest(MANIFEST)
        assert domain == CHEST
        assert domain.modalities == frozenset({"CR", "DX"})
        assert domain.rows == (256, 2500) and domain.columns == (300, 2048)
        assert domain.pixel_spacing_mm == (0.1, 0.2)
        assert domain.body_parts == frozenset({"CHEST"})  # "chest " is the same body part

    def test_no_spacing_or_body_part_is_none_and_empty(self):
        domain = TrainingDomain.from_manifest(_manifest(
            modality=["US"], photometric=["PALETTE COLOR"], rows=[480], columns=[640],
            pixel_spacing_mm=[float("nan")], body_part=[""]))
        assert domain.pixel_spacing_mm is None and domain.body_parts == frozenset()
        assert domain.channels == frozenset({3})  # PALETTE COLOR is a colour image

    def test_grayscale_and_colour_give_both_channel_counts(self):
        domain = TrainingDomain.from_manifest(_manifest(
            modality=["OT", "OT"], photometric=["RGB", "MONOCHROME2"], rows=[10, 20], columns=[30, 40],
            pixel_spacing_mm=[1.0, 1.0], body_part=["", ""]))
        assert domain.channels == frozenset({1, 3})

    def test_a_missing_column_or_no_image_is_an_error(self):
        with pytest.raises(ValueError, match="manifest rows lack column.s. body_part"):
            TrainingDomain.from_manifest(MANIFEST.drop(columns="body_part"))
        with pytest.raises(ValueError, match="no manifest row has a value in 'rows'.*got 0 rows"):
            TrainingDomain.from_manifest(MANIFEST.iloc[:0])


class TestCheck:
    def test_real_mr_ultrasound_and_rgb_files_are_refused_naming_the_attribute_and_value(self):
        mr = _refusal(CHEST, pydicom.dcmread(get_testdata_file("MR_small.dcm")))
        assert mr.startswith("Modality 'MR' is not one the model was trained on (CR, DX); ")
        us = _refusal(CHEST, pydicom.dcmread(get_testdata_file("US1_J2KR.dcm")))
        assert us.startswith("Modality 'US' is not one the model was trained on (CR, DX); "
                             "PhotometricInterpretation 'YBR_RCT' is colour (3 channels); the model was "
                             "trained on grayscale (1 channel) images (MONOCHROME1, MONOCHROME2); ")
        rgb = _refusal(CHEST, pydicom.dcmread(get_testdata_file("SC_rgb.dcm")))
        assert "Modality 'OT' is not one" in rgb and "PhotometricInterpretation 'RGB' is colour" in rgb
        # ... then what to do
        assert mr.endswith("send files like its training data, or train a model on such files")

    def test_mr_small_is_refused_for_its_size_and_spacing_by_a_large_radiograph_domain(self):
        mr = _refusal(CHEST, pydicom.dcmread(get_testdata_file("MR_small.dcm")))
        assert "Rows 64 is outside the trained range 256-2500 (accepted 205-3000 with the 20% margin)" in mr
        # 2048 * 1.2 = 2457.6: a 2458-column file is past it
        assert "Columns 64 is outside the trained range 300-2048 (accepted 240-2457 with the 20% margin)" in mr
        assert "PixelSpacing 0.3125 mm is outside the trained range 0.1-0.2 mm (accepted 0.08-0.24 mm" in mr

    def test_an_in_domain_file_passes(self, make_dicom, tmp_path):
        pixels = np.zeros((300, 320), np.uint8)
        pixels[100:200] = 200
        path = make_dicom(tmp_path / "cr.dcm", pixels, Modality="CR", PixelSpacing=[0.15, 0.15],
                          BodyPartExamined="CHEST")
        CHEST.check(pydicom.dcmread(path))
        assert CHEST.problems(pydicom.dcmread(path)) == []

    def test_ranges_are_widened_by_20_percent_each_side(self):
        for rows in (205, 256, 2500, 3000):  # 256 * 0.8 = 204.8, 2500 * 1.2 = 3000
            CHEST.check(_header(Modality="DX", Rows=rows))
        for rows in (204, 3001, 4000):
            detail = _refusal(CHEST, _header(Modality="DX", Rows=rows))
            assert detail.startswith(f"Rows {rows} is outside the trained range 256-2500 (accepted 205-3000 "
                                     "with the 20% margin); not predicted: ")
        for spacing in (0.08, 0.24):
            CHEST.check(_header(PixelSpacing=[spacing, spacing]))
        detail = _refusal(CHEST, _header(ImagerPixelSpacing=[0.05, 0.05]))
        assert detail.startswith("ImagerPixelSpacing 0.05 mm is outside the trained range 0.1-0.2 mm "
                                 "(accepted 0.08-0.24 mm with the 20% margin)")

    def test_missing_attributes_are_not_errors(self):
        CHEST.check(_header())
        CHEST.check(_header(Modality="CR"))  # no size, spacing, body part or photometric

    @pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case is not valid CS: the point
    def test_body_part_is_compared_ignoring_case_and_only_when_both_have_one(self):
        CHEST.check(_header(BodyPartExamined="chest"))
        assert _refusal(CHEST, _header(BodyPartExamined="Skull")).startswith(
            "BodyPartExamined 'SKULL' is not one the model was trained on (CHEST); ")
        unrecorded = TrainingDomain(modalities={"CR"}, photometrics={"MONOCHROME2"}, channels={1},
                                    rows=(256, 2500), columns=(256, 2500))
        unrecorded.check(_header(BodyPartExamined="SKULL", PixelSpacing=[5.0, 5.0]))  # neither recorded

    def test_photometrics_are_compared_by_channels(self):
        # ingest inverts MONOCHROME1: the model sees the same kind of image as from MONOCHROME2
        only_m2 = TrainingDomain(modalities={"DX"}, photometrics={"MONOCHROME2"}, channels={1},
                                 rows=(10, 10), columns=(10, 10))
        only_m2.check(_header(PhotometricInterpretation="MONOCHROME1"))
        assert "'PALETTE COLOR' is colour (3 channels)" in _refusal(
            only_m2, _header(PhotometricInterpretation="PALETTE COLOR"))
        colour = TrainingDomain(modalities={"US"}, photometrics={"RGB"}, channels={3}, rows=(10, 10),
                                columns=(10, 10))
        colour.check(_header(PhotometricInterpretation="YBR_FULL_422"))
        assert _refusal(colour, _header(PhotometricInterpretation="MONOCHROME2")).startswith(
            "PhotometricInterpretation 'MONOCHROME2' is grayscale (1 channel); the model was trained on "
            "colour (3 channels) images (RGB)")


class TestSerialisation:
    def test_to_dict_is_sorted_lists_and_round_trips_through_json(self):
        assert CHEST.to_dict() == {
            "modalities": ["CR", "DX"], "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
            "channels": [1], "rows": [256, 2500], "columns": [300, 2048], "pixel_spacing_mm": [0.1, 0.2],
            "body_parts": ["CHEST"], "margin": 0.2,
        }
        assert TrainingDomain.from_dict(json.loads(json.dumps(CHEST.to_dict()))) == CHEST
        no_spacing = TrainingDomain(modalities={"CR"}, photometrics={"MONOCHROME2"}, channels={1},
                                    rows=(256, 2500), columns=(256, 2500))
        assert no_spacing.to_dict()["pixel_spacing_mm"] is None and no_spacing.to_dict()["body_parts"] == []
        assert TrainingDomain.from_dict(json.loads(json.dumps(no_spacing.to_dict()))) == no_spacing

    def test_from_dict_names_missing_keys(self):
        with pytest.raises(ValueError, match="needs key.s. rows, columns .*got modalities"):
            TrainingDomain.from_dict({"modalities": ["CR"], "photometric_interpretations": [], "channels": [1]})

    def test_describe_is_one_line(self):
        assert CHEST.describe() == ("CR, DX; MONOCHROME1, MONOCHROME2 (grayscale); rows 256-2500; columns "
                                    "300-2048; pixel spacing 0.1-0.2 mm; body part CHEST (ranges accepted "
                                    "with a 20% margin)")

    def test_invalid_values_are_clear_errors(self):
        with pytest.raises(ValueError, match=r"rows must be a \(min, max\) pair with 0 < min <= max; got \(10, 5\)"):
            TrainingDomain(modalities={"CR"}, photometrics=set(), channels={1}, rows=(10, 5), columns=(1, 1))
        with pytest.raises(ValueError, match=r"channels must be 1 \(grayscale\) and/or 3 \(colour\); got \[2\]"):
            TrainingDomain(modalities={"CR"}, photometrics=set(), channels={2}, rows=(1, 1), columns=(1, 1))
