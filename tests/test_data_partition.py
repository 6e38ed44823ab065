"""The partitioner: IID sizes, Dirichlet skew, group-key splits, every index exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from fedplug.data import DatasetError
from fedplug.data.partition import (
    describe_partition,
    dirichlet_partition,
    dirichlet_proportions,
    group_assignment,
    group_partition,
    iid_partition,
    partition_class_counts,
    partition_indices,
    primary_labels,
)


def _labels(n=300, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, k + 1, size=rng.integers(1, 4)) for _ in range(n)]


def _assert_exact_cover(parts, n):
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n)), "every index must appear exactly once"


def test_iid_sizes_differ_by_at_most_one():
    parts = iid_partition(103, 5, seed=1)
    _assert_exact_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    assert parts == iid_partition(103, 5, seed=1)
    assert parts != iid_partition(103, 5, seed=2)


def test_dirichlet_skew_follows_alpha():
    labels = [np.array([c]) for c in np.repeat(np.arange(1, 5), 100)]  # 100 single-class images per class

    def skew(alpha):
        parts = dirichlet_partition(labels, 4, 4, alpha=alpha, seed=0)
        _assert_exact_cover(parts, 400)
        counts = partition_class_counts(labels, parts, 4)  # [client, class]
        # share of each class held by its biggest client, averaged over classes
        return float((counts.max(axis=0) / counts.sum(axis=0)).mean())

    assert skew(0.05) > 0.8  # nearly every class lives on one client
    assert skew(1000.0) < 0.35  # nearly even (1/4 = perfectly even)


def test_dirichlet_is_deterministic_and_consistent_across_splits():
    labels = _labels()
    assert dirichlet_partition(labels, 3, 4, 0.3, seed=7) == dirichlet_partition(labels, 3, 4, 0.3, seed=7)
    # the class proportions depend only on (seed, clients, classes, alpha): train and test share them
    p = dirichlet_proportions(3, 4, 0.3, seed=7)
    assert p.shape == (3, 4) and np.allclose(p.sum(axis=0), 1)
    assert np.array_equal(p, dirichlet_proportions(3, 4, 0.3, seed=7))


def test_dirichlet_gives_every_client_at_least_min_size():
    labels = [np.array([1])] * 50 + [np.array([2])] * 50
    parts = dirichlet_partition(labels, 6, 2, alpha=0.01, seed=0, min_size=3)
    _assert_exact_cover(parts, 100)
    assert min(len(p) for p in parts) >= 3


def test_dirichlet_handles_images_without_objects():
    labels = [np.array([], np.int64)] * 9 + [np.array([1])] * 9
    parts = dirichlet_partition(labels, 3, 1, alpha=1.0)
    _assert_exact_cover(parts, 18)
    empty_per_client = [sum(1 for i in p if i < 9) for p in parts]
    assert empty_per_client == [3, 3, 3]  # negatives are dealt evenly


def test_primary_label_is_most_frequent_ties_to_rarer_class():
    labels = [np.array([1, 1, 2]), np.array([1, 2]), np.array([2, 2]), np.array([3]), np.array([], np.int64)]
    # totals: class1=3, class2=4, class3=1 -> the tie [1, 2] goes to class 1 (rarer)
    assert primary_labels(labels, 3).tolist() == [1, 1, 2, 3, 0]


def test_group_split_keeps_each_group_on_one_client():
    keys = [3, 1, 2, 3, 1, 5, 2, 3]
    parts = group_partition(keys, 4)
    _assert_exact_cover(parts, len(keys))
    # as many groups as clients: sorted group k goes to client k
    assert [sorted({keys[i] for i in p}) for p in parts] == [[1], [2], [3], [5]]


def test_more_groups_than_clients_are_balanced():
    sizes = {"cam-a": 50, "cam-b": 40, "cam-c": 30, "cam-d": 20, "cam-e": 10}
    assignment = group_assignment(sizes, 2)
    load = [sum(s for g, s in sizes.items() if assignment[g] == c) for c in range(2)]
    assert sorted(load) == [70, 80]
    keys = [g for g, s in sizes.items() for _ in range(s)]
    parts = group_partition(keys, 2, assignment)
    _assert_exact_cover(parts, 150)
    for p in parts:  # a camera never straddles two clients
        for g in {keys[i] for i in p}:
            assert all(keys[i] != g for other in parts if other is not p for i in other)


def test_fewer_groups_than_clients_is_a_clear_error():
    with pytest.raises(DatasetError, match="cannot split 2 group"):
        group_partition(["a", "b", "a"], 3)
    with pytest.raises(DatasetError, match="no client was assigned"):
        group_partition(["a", "z"], 1, {"a": 0})


def test_dispatch_and_errors():
    labels = _labels(40)
    assert partition_indices("iid", 4, labels, 4, seed=0) == iid_partition(40, 4, seed=0)
    assert partition_indices("group", 2, labels, 4, group_keys=[i % 2 for i in range(40)])[1][:2] == [1, 3]
    with pytest.raises(DatasetError, match="unknown partition.method 'random'"):
        partition_indices("random", 2, labels, 4)
    with pytest.raises(DatasetError, match="group_key"):
        partition_indices("group", 2, labels, 4)
    with pytest.raises(DatasetError, match="alpha must be > 0"):
        partition_indices("dirichlet", 2, labels, 4, alpha=0)
    with pytest.raises(DatasetError, match="number of clients"):
        iid_partition(10, 0)


def test_describe_partition_prints_class_counts():
    labels = [np.array([1, 2]), np.array([2]), np.array([3, 3]), np.array([], np.int64)]
    printed = []
    table = describe_partition(labels, [[0, 1], [2, 3]], ("car", "person", "sign"), ["cam0", "cam1"], printed.append)
    assert printed == [table]
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["client", "images", "car", "person", "sign"]
    assert rows[1] == ["cam0", "2", "1", "2", "0"]
    assert rows[2] == ["cam1", "2", "0", "0", "2"]
    assert rows[3] == ["total", "4", "1", "2", "2"]
