"""The burned-in text corpus's ground truth: ink where the text was drawn, the header holding what
was drawn, and the variety the benchmark reports on (dicomflow.devtools.burned_in_corpus)."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pydicom
import pytest

from dicomflow.deid.identifiers import collect_identifiers
from dicomflow.devtools import burned_in_corpus as corpus

SEED = 3
ALL_KINDS = range(len(corpus.KINDS))  # image i has kind KINDS[i % len(KINDS)]
WRITTEN_DATES = ("%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%Y%m%d")  # as the issue lists them


def _frames(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]


def _changed_pixels(with_text: np.ndarray, without: np.ndarray) -> np.ndarray:
    differ = with_text != without  # (frames, rows, columns[, samples])
    if differ.ndim == 4:
        differ = differ.any(axis=-1)
    return differ.any(axis=0)


def _date_of(text: str) -> dt.date:
    """The date written at the end of ``text`` (after a label), in one of the issue's forms."""
    written = text.split()[-1]
    for form in WRITTEN_DATES:
        try:
            return dt.datetime.strptime(written, form).date()
        except ValueError:
            continue
    raise AssertionError(f"no date form fits {written!r}")


def _header_date(value: str) -> dt.date:
    return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))


class TestGroundTruth:
    @pytest.mark.parametrize("index", ALL_KINDS)
    def test_ink_is_where_the_text_was_drawn_and_nowhere_else(self, index: int) -> None:
        ds, truth = corpus.make_image(index, seed=SEED)
        bare, same = corpus.make_image(index, seed=SEED, draw=False)
        assert same.drawn == truth.drawn  # the truth does not depend on drawing
        changed = _changed_pixels(_frames(ds), _frames(bare))
        allowed = np.zeros_like(changed)
        for item in truth.drawn:
            top, left, bottom, right = item.box
            assert item.ink.shape == (bottom - top, right - left)
            inked = changed[top:bottom, left:right][item.ink]
            assert inked.mean() >= 0.9, (item.kind, item.polarity)  # the glyphs changed the pixels
            pad = max(3, item.size // 4) + 1  # the box behind boxed text
            allowed[max(0, top - pad):bottom + pad, max(0, left - pad):right + pad] = True
        assert not (changed & ~allowed).any()  # nothing drawn outside the boxes
        if not truth.drawn:
            assert not changed.any()

    @pytest.mark.parametrize("index", ALL_KINDS)
    def test_the_header_holds_what_was_drawn(self, index: int) -> None:
        ds, truth = corpus.make_image(index, seed=SEED)
        for item in truth.planted:
            if item.kind == "name":
                words = set(re.findall(r"[A-Za-z]+", item.text.upper()))
                assert words == {ds.PatientName.family_name.upper(), ds.PatientName.given_name.upper()}
                assert item.text in (f"{ds.PatientName.family_name}^{ds.PatientName.given_name}",
                                     f"{ds.PatientName.family_name.title()}, {ds.PatientName.given_name.title()}",
                                     f"{ds.PatientName.given_name} {ds.PatientName.family_name}")
            elif item.kind == "id":
                assert item.text in (f"MRN: {ds.PatientID}", f"ID {ds.PatientID}", ds.PatientID)
            elif item.kind == "accession":
                assert item.text in (f"ACC {ds.AccessionNumber}", f"Acc#: {ds.AccessionNumber}",
                                     ds.AccessionNumber)
            elif item.kind == "birth_date":
                assert _date_of(item.text) == _header_date(ds.PatientBirthDate)
            else:
                assert item.kind == "study_date"
                assert _date_of(item.text) == _header_date(ds.StudyDate)

    @pytest.mark.parametrize("index", ALL_KINDS)
    def test_planted_fields_match_the_header_and_labels_do_not(self, index: int) -> None:
        # What a reader that read every letter right would decide, by the scanner's matching.
        ds, truth = corpus.make_image(index, seed=SEED)
        identifiers = collect_identifiers(ds)
        assert all(identifiers.first(item.text) for item in truth.planted)
        assert not any(identifiers.first(item.text) for item in truth.labels)

    def test_clean_images_show_no_identifier(self) -> None:
        truths = [corpus.make_image(index, seed=SEED)[1] for index in range(2 * corpus.CLEAN_EVERY)]
        clean = [truth for truth in truths if truth.clean]
        assert len(clean) == 2 and all(not truth.planted for truth in clean)
        assert all(truth.planted for truth in truths if not truth.clean)

    def test_written_files_are_deterministic_and_a_prefix(self, tmp_path) -> None:
        small = corpus.write_corpus(tmp_path / "a", 2, seed=SEED)
        large = corpus.write_corpus(tmp_path / "b", 3, seed=SEED)
        assert [t.name for t in small] == [t.name for t in large[:2]]
        for truth in small:
            assert (tmp_path / "a" / truth.name).read_bytes() == (tmp_path / "b" / truth.name).read_bytes()
        read = pydicom.dcmread(tmp_path / "b" / large[2].name)
        assert (read.Rows, read.Columns) == (large[2].rows, large[2].columns)


@pytest.mark.slow
class TestVariety:
    """What the benchmark's tables break recall down by is present in a corpus of 70 images."""

    @pytest.fixture(scope="class")
    def truths(self) -> list[corpus.CorpusImage]:
        return [corpus.make_image(index, seed=0)[1] for index in range(70)]

    def test_every_kind_with_and_without_identifiers(self, truths) -> None:
        assert {(t.kind, t.clean) for t in truths} == {(k, c) for k in set(corpus.KINDS) for c in (False, True)}

    def test_fonts_sizes_polarities_and_fields(self, truths) -> None:
        planted = [item for t in truths for item in t.planted]
        assert {item.polarity for item in planted} == set(corpus.POLARITIES)
        assert {item.kind for item in planted} == set(corpus.FIELDS)
        assert len({item.font for item in planted}) >= min(6, len(corpus.available_fonts()))
        assert corpus.DEFAULT_FONT in {item.font for item in planted}
        sizes = [item.size for item in planted]
        assert min(sizes) <= 16 and max(sizes) >= 36 and all(14 <= s <= 40 for s in sizes)
        assert {t.frames > 1 for t in truths} == {True, False}
        assert (2500, 2048) in {(t.rows, t.columns) for t in truths if t.kind in ("CR", "DX")}


class TestRealImages:
    def test_planted_on_blank_parts_of_a_real_ultrasound(self) -> None:
        path = next(p for p in corpus.real_image_files() if p.name == "GREYSCALE_IMAGE.dcm")
        original = corpus.read_real(path)
        before = _frames(original).copy()
        planted = corpus.read_real(path)
        truth = corpus.plant_on_real(planted, seed=0, index=0)
        after = _frames(planted)
        assert {item.kind for item in truth.planted} >= {"name", "id", "birth_date", "study_date"}
        changed = _changed_pixels(after, before)
        for item in truth.planted:
            top, left, bottom, right = item.box
            assert before[:, max(0, top - 6):bottom + 6, max(0, left - 6):right + 6].max() <= 24  # was blank
            assert changed[top:bottom, left:right][item.ink].mean() >= 0.9
        identifiers = collect_identifiers(original)  # the header's own values were drawn
        assert all(identifiers.first(item.text) for item in truth.planted)
