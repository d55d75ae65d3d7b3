"""The memory-mapped dataset and the rank-aware samplers."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from galaxydist.data.dataset import GalaxyDataset, make_loader
from galaxydist.data.format import read_prepared
from galaxydist.data.samplers import ShardBatches, TrainBatches
from galaxydist.errors import UserError


def test_dataset_is_a_readonly_memmap_of_the_file(tiny_prepared):
    ds = GalaxyDataset(read_prepared(tiny_prepared), "train")
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable
    assert ds.images.filename == str(tiny_prepared.resolve())
    with h5py.File(tiny_prepared) as f:
        assert ds.images.offset == f["images"].id.get_offset()
        row = int(ds.rows[3])
        np.testing.assert_array_equal(ds.images[row], f["images"][row])


def test_items_are_uint8_chw_with_labels_and_rows(tiny_prepared):
    info = read_prepared(tiny_prepared)
    ds = GalaxyDataset(info, "val")
    image, label, row = ds[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and int(label) == info.labels[ds.rows[2]] and int(row) == ds.rows[2]
    images, labels, rows = ds[[5, 1, 3]]
    assert images.shape == (3, 3, 32, 32) and rows.tolist() == ds.rows[[5, 1, 3]].tolist()
    assert labels.tolist() == info.labels[ds.rows[[5, 1, 3]]].tolist()
    np.testing.assert_array_equal(images[1].numpy(), ds[1][0].numpy())


def test_pickle_carries_no_pixels(tiny_prepared):
    ds = GalaxyDataset(read_prepared(tiny_prepared), "train")
    _ = ds[[0, 1]]  # map it in this process first
    blob = pickle.dumps(ds)
    assert len(blob) < 40_000 < ds.images.nbytes
    clone = pickle.loads(blob)
    assert torch.equal(clone[[0, 1]][0], ds[[0, 1]][0])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_read_identical_bytes(tiny_prepared, context):
    info = read_prepared(tiny_prepared)
    ds = GalaxyDataset(info, "train")
    batches = ShardBatches(len(ds), rank=0, world_size=1, batch_size=50)
    expected = torch.cat([b[0] for b in make_loader(ds, batches, num_workers=0)])
    loader = torch.utils.data.DataLoader(
        ds, sampler=batches, batch_size=None, num_workers=2, multiprocessing_context=context
    )
    got = torch.cat([b[0] for b in loader])
    assert torch.equal(got, expected)
    with h5py.File(tiny_prepared) as f:
        np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), f["images"][()][ds.rows])


def test_train_batches_cover_the_epoch_like_one_rank(tiny_prepared):
    """World size 3, N not divisible by 3: each global batch is the same set as on one rank."""
    n, global_batch = 421, 24
    one = TrainBatches(n, rank=0, world_size=1, per_rank_batch=global_batch, seed=7)
    three = [
        TrainBatches(n, rank=r, world_size=3, per_rank_batch=global_batch // 3, seed=7) for r in range(3)
    ]
    for epoch in (0, 1):
        for sampler in [one, *three]:
            sampler.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in three]
        assert len(single) == n // global_batch == len(per_rank[0])
        for b, batch in enumerate(single):
            merged = sorted(i for r in range(3) for i in per_rank[r][b])
            assert merged == sorted(batch)
        seen = [i for batch in single for i in batch]
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
    epoch0 = TrainBatches(n, 0, 1, global_batch, 7)
    epoch0.set_epoch(0)
    assert list(epoch0) != single  # a new order each epoch


def test_train_batches_resume_mid_epoch(tiny_prepared):
    full = TrainBatches(100, rank=1, world_size=2, per_rank_batch=10, seed=0)
    full.set_epoch(3)
    rest = TrainBatches(100, rank=1, world_size=2, per_rank_batch=10, seed=0)
    rest.set_epoch(3, start=2)
    assert list(rest) == list(full)[2:] and len(rest) == len(full) - 2


@pytest.mark.parametrize("n", [10, 11, 2])
def test_shards_cover_every_sample_exactly_once(n):
    shards = [ShardBatches(n, rank=r, world_size=3, batch_size=2) for r in range(3)]
    seen = [i for s in shards for batch in s for i in batch]
    assert sorted(seen) == list(range(n))
    assert [len(list(s)) for s in shards] == [len(s) for s in shards]


def test_truncated_prepared_file_is_detected(tiny_prepared, tmp_path):
    copy = tmp_path / "cut.h5"
    data = tiny_prepared.read_bytes()
    copy.write_bytes(data[: len(data) - 5000])
    with pytest.raises(UserError, match=r"truncated|not a readable"):
        read_prepared(copy)


def test_non_prepared_file_is_refused(raw_small):
    with pytest.raises(UserError, match="not a prepared galaxydist file"):
        read_prepared(raw_small)
