"""The leave-one-out split of METHOD §0, truncation, id maps and what the graph stage may see."""
import json

import numpy as np
import pytest

from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import UsageError
from tests.conftest import shared_dataset


def write(tmp_path, text, attrs=None):
    (tmp_path / "sequences.txt").write_text(text)
    if attrs is not None:
        (tmp_path / "item2attributes.json").write_text(json.dumps(attrs))
    return tmp_path


def test_split_follows_method_section_0(tmp_path):
    # user 10: 5 items, user 20: 2 items (train only), user 30: 3 items
    ds = load_dataset(write(tmp_path, "10 1 2 3 4 5\n\n20 6 7\n30 8 9 1\n"))
    assert ds.n_users == 3 and ds.n_items == 9 and ds.n_interactions == 10
    assert ds.user_ids.tolist() == [10, 20, 30]
    s = ds.train_samples
    got = [(int(u), ds.items[a:b].tolist(), int(ds.items[b])) for u, a, b in zip(s.users, s.hist_start, s.target_pos)]
    assert got == [(0, [1], 2), (0, [1, 2], 3), (1, [6], 7)]  # user 30's train part [8] has no prefix→next
    for name, hist, tgt in (("valid", [[1, 2, 3], [8]], [4, 9]), ("test", [[1, 2, 3, 4], [8, 9]], [5, 1])):
        sp = ds.split(name)
        assert sp.users.tolist() == [0, 2]
        assert [ds.items[a:b].tolist() for a, b in zip(sp.hist_start, sp.hist_end)] == hist
        assert sp.targets.tolist() == tgt
    u, i = ds.train_interactions()
    assert sorted(zip(u.tolist(), i.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 6), (1, 7), (2, 8)]
    assert ds.item_train_counts().tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 1, 0]


def test_truncation_keeps_last_max_len(tmp_path):
    ds = load_dataset(write(tmp_path, "1 " + " ".join(map(str, range(1, 11))) + "\n"), max_len=4)
    assert ds.history(0).tolist() == [7, 8, 9, 10]
    assert ds.n_interactions == 10
    assert ds.split("test").targets.tolist() == [10]
    assert ds.items[ds.split("valid").hist_start[0] : ds.split("valid").hist_end[0]].tolist() == [7, 8]
    assert len(ds.train_samples) == 1


def test_graph_stage_never_sees_valid_or_test_items(synth_dir):
    ds = load_dataset(synth_dir)
    u, i = ds.train_interactions()
    pairs = set(zip(u.tolist(), i.tolist()))
    for name in ("valid", "test"):
        sp = ds.split(name)
        for user, target in zip(sp.users.tolist(), sp.targets.tolist()):
            if target not in ds.history(user)[:-2].tolist():
                assert (user, target) not in pairs


def test_dataset_is_immutable(synth_dir):
    ds = load_dataset(synth_dir)
    with pytest.raises(ValueError):
        ds.items[0] = 3
    with pytest.raises(AttributeError):
        ds.n_items = 4
    with pytest.raises(ValueError):
        ds.modalities["image"].dense[0, 0] = 1.0
    with pytest.raises(TypeError):
        ds.modalities["x"] = None


def test_modalities_and_texts(synth_dir):
    ds = load_dataset(synth_dir)
    assert set(ds.modalities) == {"attributes", "image", "text"}
    assert ds.modalities["image"].rows(0, 5).shape == (5, 32)
    att = ds.modalities["attributes"].rows(0, ds.n_items)
    assert att.dtype == np.float32 and set(np.unique(att)) <= {0.0, 1.0} and (att.sum(1) >= 1).all()
    raw = json.loads((synth_dir / "item2attributes.json").read_text())
    assert att[0].sum() == len(set(raw["1"]))
    assert ds.item_texts[1].startswith("Synthetic item 1.")


def test_user_index_maps_external_ids(tmp_path):
    ds = load_dataset(write(tmp_path, "7 1 2 3\n3 2 3 4\n"))
    assert ds.user_index([3, 7]).tolist() == [1, 0]
    with pytest.raises(KeyError, match="unknown user id 5"):
        ds.user_index([5])


def test_fingerprint_changes_with_content_and_max_len(tmp_path):
    a = load_dataset(write(tmp_path, "1 1 2 3\n"))
    assert a.fingerprint == load_dataset(tmp_path).fingerprint
    assert a.fingerprint != load_dataset(tmp_path, max_len=10).fingerprint
    (tmp_path / "sequences.txt").write_text("1 1 2 4\n")
    assert a.fingerprint != load_dataset(tmp_path).fingerprint


def test_max_len_below_three_is_rejected(tmp_path):
    with pytest.raises(UsageError):
        load_dataset(write(tmp_path, "1 1 2 3\n"), max_len=2)


@pytest.mark.realdata
def test_toys_counts():
    ds = load_dataset(shared_dataset("toys"))
    st = ds.stats()
    assert (st["users"], st["items"], st["interactions"]) == (19412, 11924, 167597)
    assert st["valid_users"] == st["test_users"] == 19412
    assert st["modalities"] == {"attributes": 1027}
    # every Toys user has ≥ 5 items: one training sample per training item after the first
    assert st["train_samples"] == int((np.minimum(ds.lengths, 50) - 3).sum())


@pytest.mark.realdata
def test_scientific_modalities():
    ds = load_dataset(shared_dataset("scientific"))
    assert ds.stats()["modalities"] == {"image": 512, "text": 512}
    assert ds.item_texts is not None and ds.n_items == 1585
