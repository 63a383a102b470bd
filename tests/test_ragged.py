import numpy as np
import pytest

from tokenclean.io import fingerprint
from tokenclean.ragged import Ragged


def test_roundtrip_and_layout(tmp_path):
    r = Ragged.from_list([[1.0, np.nan], [3.0], [4.0, 5.0, 6.0]], np.float32)
    assert len(r) == 3 and r.lengths.tolist() == [2, 1, 3] and r.example_ids().tolist() == [0, 0, 1, 2, 2, 2]
    r.save(tmp_path / "losses", {"data_fingerprint": "abc", "model_fingerprint": "m1"})
    back = Ragged.load(tmp_path / "losses", {"data_fingerprint": "abc", "model_fingerprint": "m1"})
    np.testing.assert_array_equal(back.values, r.values)
    np.testing.assert_array_equal(back.offsets, r.offsets)
    assert back.select([2, 0])[0].tolist() == [4.0, 5.0, 6.0]


def test_fingerprint_mismatch_is_refused(tmp_path):
    Ragged.from_list([[1.0]], np.float32).save(tmp_path / "losses", {"model_fingerprint": "m1"})
    with pytest.raises(ValueError, match="model_fingerprint='m1' does not match the current 'm2'"):
        Ragged.load(tmp_path / "losses", {"model_fingerprint": "m2"})


def test_an_array_without_its_meta_is_incomplete(tmp_path):
    r = Ragged.from_list([[1.0]], np.float32)
    r.save(tmp_path / "scores", {})
    (tmp_path / "scores.json").unlink()    # as if killed after the .npy files, before the meta
    assert not Ragged.exists(tmp_path / "scores")
    with pytest.raises(FileNotFoundError, match="no complete per-token array"):
        Ragged.load(tmp_path / "scores")


def test_fingerprint_sees_values_and_layout():
    a = Ragged.from_list([[1, 2], [3]], np.int32)
    b = Ragged.from_list([[1], [2, 3]], np.int32)
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(Ragged.from_list([[1, 2], [3]], np.int32))


def test_concat_and_row_sums_with_an_empty_example():
    a = Ragged.from_list([[True, False, True], []], bool)
    b = Ragged.from_list([[True], [False, False]], bool)
    c = Ragged.concat([a, b])
    assert c.lengths.tolist() == [3, 0, 1, 2] and c[2].tolist() == [True]
    assert c.row_sums().tolist() == [2, 0, 1, 0]
    assert Ragged.from_list([[1.5, 2.0], [4.0]], np.float32).row_sums().tolist() == [3.5, 4.0]
