"""The versioned record schema: record validation (one reason per fault), shard schema checks and
reading shards of an older version."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from gammaray.schema import (ALL_REASONS, RECORD_SCHEMA, SCHEMA_VERSION, Invalid, Limits, Reason, SchemaError,
                             check_readable, check_table_schema, conform_table, is_blank, pair_slots, validate_record)

pytestmark = pytest.mark.ingest

GOOD = {"product_id": "P-1", "title": "  Red   mug ", "description": "A mug.", "category": "Home > Mugs",
        "image": b"\xff\xd8jpeg", "locale": "en_US", "attributes": {"colour": "red", "size": 2},
        "titles": {"de_DE": "Roter Becher"}, "extra_images": [b"\xff\xd8more", b""]}


def test_a_good_record_is_normalised_deterministically():
    rec = validate_record(GOOD)
    assert rec["title"] == "Red mug"
    assert rec["attributes"] == [("colour", "red"), ("size", "2")]  # sorted pairs: deterministic shards
    assert rec["titles"] == [("de_DE", "Roter Becher")]
    assert rec["extra_images"] == [b"\xff\xd8more"]  # empty extra images dropped
    table = pa.Table.from_pylist([{**rec, "sample_index": 0}], schema=RECORD_SCHEMA)
    assert table.column("titles").to_pylist() == [[("de_DE", "Roter Becher")]]


@pytest.mark.parametrize("change, reason", [
    ({"product_id": None}, Reason.MISSING_FIELD),
    ({"product_id": "  "}, Reason.MISSING_FIELD),
    ({"product_id": 3.5}, Reason.WRONG_TYPE),
    ({"title": None}, Reason.EMPTY_TEXT),
    ({"title": " \t "}, Reason.EMPTY_TEXT),
    ({"title": 12345}, Reason.WRONG_TYPE),
    ({"title": b"Caf\xe9"}, Reason.NON_UTF8_TEXT),
    ({"title": "Caf\ufffd"}, Reason.NON_UTF8_TEXT),
    ({"description": "x" * 101}, Reason.OVERSIZED_TEXT),
    ({"category": ["a", "b"]}, Reason.WRONG_TYPE),
    ({"attributes": [1, 2, 3]}, Reason.WRONG_TYPE),
    ({"attributes": "{not json"}, Reason.WRONG_TYPE),
    ({"titles": {"de": {"nested": 1}}}, Reason.WRONG_TYPE),
    ({"image": None}, Reason.MISSING_FIELD),
    ({"image": b""}, Reason.IMAGE_EMPTY),
    ({"image": "path.jpg"}, Reason.WRONG_TYPE),
    ({"extra_images": "x.jpg"}, Reason.WRONG_TYPE),
])
def test_each_fault_has_its_own_reason(change, reason):
    with pytest.raises(Invalid) as err:
        validate_record({**GOOD, **change}, Limits(max_text_chars=100))
    assert err.value.reason == reason
    field = next(iter(change))
    assert field in err.value.detail or reason in (Reason.IMAGE_EMPTY, Reason.EMPTY_TEXT)


def test_reason_codes_are_unique_strings():
    assert len(set(ALL_REASONS)) == len(ALL_REASONS) >= 14
    assert all(isinstance(r, str) and r == r.lower() for r in ALL_REASONS)


text_st = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40)


@given(pid=text_st.filter(lambda s: not is_blank(s)), title=text_st.filter(lambda s: not is_blank(s)), desc=st.none() | text_st,
       attrs=st.none() | st.dictionaries(text_st, text_st, max_size=4), image=st.binary(min_size=1, max_size=64))
@settings(max_examples=150, deadline=None)
def test_any_valid_record_fits_the_arrow_schema_and_roundtrips(pid, title, desc, attrs, image):
    rec = validate_record({"product_id": pid, "title": title, "description": desc, "attributes": attrs, "image": image})
    assert rec["title"] == " ".join(title.split()) and rec["title"]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{**rec, "sample_index": 7}], schema=RECORD_SCHEMA), buf)
    back = pq.read_table(pa.BufferReader(buf.getvalue())).to_pylist()[0]
    assert back["product_id"] == pid.strip() and back["image"] == image and back["sample_index"] == 7
    assert (back["attributes"] or []) == (rec["attributes"] or [])
    check_table_schema(pq.read_schema(pa.BufferReader(buf.getvalue())), "roundtrip")


def _v1_shard() -> bytes:
    v1 = pa.schema([f for f in RECORD_SCHEMA if f.name not in ("titles", "extra_images")],
                   metadata={b"gammaray.schema_version": b"1"})
    t = pa.Table.from_pylist([{"product_id": "A", "sample_index": 0, "title": "t", "image": b"i"}], schema=v1)
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def test_version_1_shards_are_read_with_the_new_columns_as_nulls():
    data = _v1_shard()
    schema = pq.read_schema(pa.BufferReader(data))
    check_table_schema(schema, "v1.parquet")  # titles/extra_images may be absent in version 1
    t = conform_table(pq.read_table(pa.BufferReader(data)))
    assert t.schema.names == RECORD_SCHEMA.names
    assert t.column("titles").to_pylist() == [None] and t.column("extra_images").to_pylist() == [None]


def test_shard_schema_errors_name_the_file_and_the_column():
    t = pa.table({"product_id": ["A"], "sample_index": [0], "title": [3], "image": [b"x"]})
    t = t.replace_schema_metadata({b"gammaray.schema_version": str(SCHEMA_VERSION).encode()})
    with pytest.raises(SchemaError, match=r"s3://b/x.parquet: column 'title' has type int64"):
        check_table_schema(t.schema, "s3://b/x.parquet", ["product_id", "title"])
    with pytest.raises(SchemaError, match=r"column 'category' is missing"):
        check_table_schema(t.schema, "x", ["category"])
    with pytest.raises(SchemaError, match="newer gammaray"):
        check_readable(SCHEMA_VERSION + 1, "manifest.json")


def test_view_pairs_name_model_output_slots():
    assert pair_slots("image_text") == ("image", "text")
    assert pair_slots("text_text") == ("text", "text_pair")
    assert pair_slots("image_image") == ("image", "image_pair")
    with pytest.raises(ValueError, match="unknown view pair"):
        pair_slots("audio_text")


@given(title=st.text(alphabet=st.sampled_from(" \t\n\x1b\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u3164\u2800\u00a0"),
                     max_size=12))
@settings(max_examples=60, deadline=None)
def test_a_title_that_shows_nothing_is_empty_text(title):
    """Issue 23 row 11: zero-width, format, control and blank-filler characters alone are no title."""
    with pytest.raises(Invalid) as err:
        validate_record({"product_id": "P", "title": title, "image": b"x"})
    assert err.value.reason == Reason.EMPTY_TEXT
    assert validate_record({"product_id": "P", "title": title + "lamp", "image": b"x"})["title"].endswith("lamp")
