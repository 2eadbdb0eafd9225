"""mdlib.nsd.design on designs written in NSD's format (nsd_expdesign.mat) by the tests themselves.

The real 8,859 / 982 split comes from NSD's real masterordering, which is not in the repository (NSD may not
be redistributed). So the tests check the *rule* on a design built with NSD's real sizes (30,000 trials,
40 sessions x 750, 10,000 images per subject, 1,000 shared) against a brute-force loop over trials. That
design is built so that sessions 1-37 reproduce the published counts (141 non-shared and 18 shared images shown
only in sessions 38-40, and 176 more shared presentations there), which the loop and the library must both find.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.io

from mdlib.nsd import layout
from mdlib.nsd.design import TRIAL_COLUMNS, Design, load_design

N_SUBJECTS = 8


def write_design(root, masterordering, subjectim, sharedix, basiccnt=None):
    """Write nsd_expdesign.mat as NSD does: MATLAB doubles, row vectors (1, n)."""
    path = root / str(layout.expdesign())
    path.parent.mkdir(parents=True, exist_ok=True)
    mat = {
        "masterordering": np.asarray(masterordering, dtype=float)[None, :],
        "subjectim": np.asarray(subjectim, dtype=float),
        "sharedix": np.asarray(sharedix, dtype=float)[None, :],
    }
    if basiccnt is not None:
        mat["basiccnt"] = np.asarray(basiccnt, dtype=float)
    scipy.io.savemat(path, mat)
    return path


# -- a reduced design, small enough to work out by hand ------------------------------------------------------
# 4 images per subject (2 shared), each shown 3 times, in 3 sessions of 5, 4 and 3 trials.
SMALL_ORDER = [3, 1, 4, 2, 1, 3, 2, 4, 1, 4, 2, 3]
SMALL_SHARED = [11, 21]  # 1-based nsdIds
# basiccnt[r, k]: trials of session k+1 that are an image's (r+1)-th presentation; column sums = 5, 4, 3.
SMALL_BASICCNT = [[4, 0, 0], [1, 3, 0], [0, 1, 3]]


def small_subjectim():
    return np.array([SMALL_SHARED + [100 * s + 1, 100 * s + 2] for s in range(1, N_SUBJECTS + 1)])


@pytest.fixture
def small_root(tmp_path):
    write_design(tmp_path, SMALL_ORDER, small_subjectim(), SMALL_SHARED, SMALL_BASICCNT)
    return tmp_path


def test_small_design_sizes(small_root):
    design = load_design(small_root)
    assert (design.n_trials, design.n_sessions, design.n_images, design.n_shared) == (12, 3, 4, 2)
    assert design.trials_per_session.tolist() == [5, 4, 3]
    assert design.session_starts.tolist() == [0, 5, 9]


def test_small_design_trial_table_by_hand(small_root):
    table = load_design(small_root).trials(1)
    # subject 1 sees nsdIds (1-based) [11, 21, 101, 102] -> 0-based 10, 20, 100, 101
    expected = pd.DataFrame(
        [  # trial, session, volume, image_index, nsd_id, shared, repeat
            (0, 1, 0, 3, 100, False, 0),
            (1, 1, 1, 1, 10, True, 0),
            (2, 1, 2, 4, 101, False, 0),
            (3, 1, 3, 2, 20, True, 0),
            (4, 1, 4, 1, 10, True, 1),
            (5, 2, 0, 3, 100, False, 1),
            (6, 2, 1, 2, 20, True, 1),
            (7, 2, 2, 4, 101, False, 1),
            (8, 2, 3, 1, 10, True, 2),
            (9, 3, 0, 4, 101, False, 2),
            (10, 3, 1, 2, 20, True, 2),
            (11, 3, 2, 3, 100, False, 2),
        ],
        columns=list(TRIAL_COLUMNS),
    )
    pd.testing.assert_frame_equal(table.reset_index(drop=True), expected, check_dtype=False)
    assert table["shared"].dtype == bool


def test_small_design_other_subject_and_session_subset(small_root):
    design = load_design(small_root)
    table = design.trials(5, sessions=[2, 3])
    assert table["trial"].tolist() == list(range(5, 12))
    assert table["session"].tolist() == [2, 2, 2, 2, 3, 3, 3]
    assert table["volume"].tolist() == [0, 1, 2, 3, 0, 1, 2]
    # repeats are counted over the whole experiment, not restarted in the selection
    assert table["repeat"].tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert table["nsd_id"].tolist() == [500, 20, 501, 10, 501, 20, 500]


def test_small_design_basiccnt_matches_repeats(small_root):
    # the fixture's basiccnt is what its name says: per session, trials by presentation number
    table = load_design(small_root).trials(1)
    counts = pd.crosstab(table["repeat"], table["session"]).to_numpy()
    np.testing.assert_array_equal(counts, SMALL_BASICCNT)


def test_small_design_split(small_root):
    design = load_design(small_root)
    split = design.split(1, sessions=[1])
    assert split.train_ids.tolist() == [100, 101]
    assert split.test_ids.tolist() == [10, 20]
    assert split.n_repeats.to_dict() == {10: 2, 20: 1, 100: 1, 101: 1}
    assert len(split.test_trials) == 3 and len(split.train_trials) == 2
    assert split.sessions == (1,)

    last = design.split(2, sessions=range(3, 4))
    assert last.train_ids.tolist() == [200, 201]
    assert last.test_ids.tolist() == [20]


@pytest.mark.parametrize("sessions", [None, range(1, 4), [3, 1, 2, 2]])
def test_all_sessions_any_spelling(small_root, sessions):
    table = load_design(small_root).trials(1, sessions)
    assert table["trial"].tolist() == list(range(12))


# -- session lengths ---------------------------------------------------------------------------------------
def test_without_basiccnt_sessions_are_750_trials(tmp_path, rng):
    n_images, n_shared = 500, 50
    order = np.repeat(np.arange(1, n_images + 1), 3)  # 1500 trials = 2 sessions of 750
    rng.shuffle(order)
    subjectim = np.array([np.r_[np.arange(1, n_shared + 1), 1000 * s + np.arange(n_images - n_shared)]
                          for s in range(1, N_SUBJECTS + 1)])
    write_design(tmp_path, order, subjectim, np.arange(1, n_shared + 1))
    design = load_design(tmp_path)
    assert design.trials_per_session.tolist() == [750, 750]
    assert design.trials(1)["volume"].tolist() == list(range(750)) * 2


def test_basiccnt_not_matching_falls_back_and_checks_750(tmp_path):
    wrong = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # totals 3, not 12
    path = write_design(tmp_path, SMALL_ORDER, small_subjectim(), SMALL_SHARED, wrong)
    with pytest.raises(ValueError, match="750") as err:
        load_design(tmp_path)
    assert str(path) in str(err.value)


# -- a design with NSD's real sizes, checked against a brute-force loop --------------------------------------
NSD_TRIALS, NSD_PER_SESSION, NSD_IMAGES, NSD_SHARED, NSD_STIMULI = 30000, 750, 10000, 1000, 73000
LATE_TRAIN, LATE_TEST, PARTIAL_TEST = 141, 18, 176  # shown only after session 37 / once after session 37


def nsd_sized_design(rng):
    """(masterordering, subjectim, sharedix) with NSD's sizes; sessions 1-37 give 8,859 / 982 / 2,770."""
    head_trials = 37 * NSD_PER_SESSION
    shared, other = np.arange(1, NSD_SHARED + 1), np.arange(NSD_SHARED + 1, NSD_IMAGES + 1)
    late_test = rng.choice(shared, LATE_TEST, replace=False)
    late_train = rng.choice(other, LATE_TRAIN, replace=False)
    partial_test = rng.choice(np.setdiff1d(shared, late_test), PARTIAL_TEST, replace=False)
    n_partial_train = NSD_TRIALS - head_trials - 3 * (LATE_TEST + LATE_TRAIN) - PARTIAL_TEST
    partial_train = rng.choice(np.setdiff1d(other, late_train), n_partial_train, replace=False)

    tail = np.concatenate([np.repeat(late_test, 3), np.repeat(late_train, 3), partial_test, partial_train])
    counts = np.full(NSD_IMAGES + 1, 3)
    counts[0] = 0
    np.subtract.at(counts, tail, 1)
    head = np.repeat(np.arange(NSD_IMAGES + 1), counts)
    assert head.size == head_trials
    order = np.concatenate([rng.permutation(head), rng.permutation(tail)])

    # NSD's 73,000 images = 1,000 shared + 8 x 9,000 seen by one subject only
    ids = rng.permutation(NSD_STIMULI) + 1
    sharedix = ids[:NSD_SHARED]
    own = ids[NSD_SHARED:].reshape(N_SUBJECTS, NSD_IMAGES - NSD_SHARED)
    subjectim = np.concatenate([np.tile(sharedix, (N_SUBJECTS, 1)), own], axis=1)
    return order, subjectim, sharedix


def brute_force(order, subjectim, subject, sessions):
    """The papers' rule with plain loops: (train ids, test ids, test trials, rows of the trial table)."""
    train, test, test_trials, rows, seen = set(), set(), 0, [], {}
    for t in range(len(order)):
        image = int(order[t])
        repeat = seen.get(image, 0)
        seen[image] = repeat + 1
        session = t // NSD_PER_SESSION + 1
        if session not in sessions:
            continue
        nsd_id = int(subjectim[subject - 1][image - 1]) - 1
        is_shared = image <= NSD_SHARED
        rows.append((t, session, t % NSD_PER_SESSION, image, nsd_id, is_shared, repeat))
        if is_shared:
            test.add(nsd_id)
            test_trials += 1
        else:
            train.add(nsd_id)
    return sorted(train), sorted(test), test_trials, rows


@pytest.fixture(scope="module")
def nsd_sized(tmp_path_factory):
    rng = np.random.default_rng(2022)
    order, subjectim, sharedix = nsd_sized_design(rng)
    root = tmp_path_factory.mktemp("nsd_sized")
    basiccnt = np.full((3, 40), 250)  # column sums 750, as in NSD
    write_design(root, order, subjectim, sharedix, basiccnt)
    return load_design(root), order, subjectim


def test_nsd_sized_design_sizes(nsd_sized):
    design, _, _ = nsd_sized
    assert (design.n_trials, design.n_sessions, design.n_images, design.n_shared) == (30000, 40, 10000, 1000)
    assert set(design.trials_per_session.tolist()) == {750}


@pytest.mark.parametrize("subject", [1, 7])
def test_papers_split_sessions_1_to_37(nsd_sized, subject):
    design, order, subjectim = nsd_sized
    split = design.split(subject, sessions=range(1, 38))
    train, test, test_trials, _ = brute_force(order, subjectim, subject, set(range(1, 38)))
    assert split.train_ids.tolist() == train
    assert split.test_ids.tolist() == test
    assert len(split.test_trials) == test_trials
    # the design was built to reproduce the published counts; the rule (and the loop) must find them
    assert (split.n_train, split.n_test, test_trials) == (8859, 982, 2770)
    assert split.sessions == tuple(range(1, 38))


def test_all_40_sessions_give_9000_1000(nsd_sized):
    design, order, subjectim = nsd_sized
    split = design.split(2)
    assert (split.n_train, split.n_test) == (9000, 1000)
    assert set(split.n_repeats) == {3}
    # every subject's test set is the same shared images; train sets are disjoint
    other = design.split(5)
    np.testing.assert_array_equal(split.test_ids, other.test_ids)
    assert not set(split.train_ids) & set(other.train_ids)


def test_trial_table_matches_brute_force(nsd_sized):
    design, order, subjectim = nsd_sized
    sessions = {2, 5, 38, 40}
    table = design.trials(5, sessions=sorted(sessions))
    _, _, _, rows = brute_force(order, subjectim, 5, sessions)
    assert list(table.columns) == list(TRIAL_COLUMNS)
    assert [tuple(r) for r in table.itertuples(index=False)] == rows


def test_repeats_over_whole_experiment(nsd_sized):
    design, _, _ = nsd_sized
    table = design.trials(1)
    assert sorted(table.groupby("nsd_id")["repeat"].apply(list).map(tuple).unique()) == [(0, 1, 2)]
    # in trial order each image's presentations are numbered 0, 1, 2
    assert (table.groupby("nsd_id")["trial"].rank(method="first").astype(int) - 1).equals(table["repeat"])


def test_sessions_beyond_what_a_subject_completed(nsd_sized):
    design, _, _ = nsd_sized
    assert design.completed_sessions(3) == 32 and design.completed_sessions(4) == 30
    assert design.trials(3)["session"].max() == 32
    with pytest.raises(ValueError, match="subject 3 has sessions 1..32"):
        design.split(3, sessions=range(1, 38))
    with pytest.raises(ValueError, match="1-based"):
        design.split(1, sessions=range(0, 37))
    with pytest.raises(ValueError, match=r"\[41\]"):
        design.trials(1, sessions=[40, 41])


def test_sessions_beyond_a_small_design(small_root):
    design = load_design(small_root)
    # no responses.tsv here: NSD's 32 of 40 sessions scaled to the design's 3 (the rule mini-NSD is written with)
    assert design.completed_sessions(3) == 2 and design.completed_sessions(1) == 3
    with pytest.raises(ValueError, match="sessions 1..3"):
        design.split(1, sessions=range(1, 5))


@pytest.mark.parametrize("subject", [0, 9, -1, 1.5, "1"])
def test_bad_subject(small_root, subject):
    with pytest.raises(ValueError, match="subjects 1..8"):
        load_design(small_root).trials(subject)


@pytest.mark.parametrize("sessions, error", [(37, TypeError), ([], ValueError), ([1.5], TypeError)])
def test_bad_session_arguments(small_root, sessions, error):
    with pytest.raises(error):
        load_design(small_root).trials(1, sessions)


# -- files that are missing, damaged or not NSD-shaped --------------------------------------------------------
def test_missing_file_names_the_nsd_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nsddata/experiments/nsd/nsd_expdesign.mat") as err:
        load_design(tmp_path)
    assert "s3://natural-scenes-dataset/" in str(err.value)


@pytest.mark.parametrize("keep", [10, 100, 0.5])
def test_truncated_file(small_root, keep):
    path = small_root / str(layout.expdesign())
    data = path.read_bytes()
    path.write_bytes(data[: int(keep if keep >= 1 else len(data) * keep)])
    with pytest.raises(ValueError, match="cannot read") as err:
        load_design(small_root)
    assert str(path) in str(err.value)


def test_garbage_file(tmp_path):
    path = tmp_path / str(layout.expdesign())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a MATLAB file " * 20)
    with pytest.raises(ValueError, match=str(path)):
        load_design(tmp_path)


def test_missing_variable(tmp_path):
    path = tmp_path / str(layout.expdesign())
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"masterordering": np.ones((1, 3))})
    with pytest.raises(ValueError, match="sharedix"):
        load_design(tmp_path)


@pytest.mark.parametrize("bad_value", [0, 5])
def test_masterordering_out_of_range(tmp_path, bad_value):
    order = list(SMALL_ORDER)
    order[4] = bad_value
    path = write_design(tmp_path, order, small_subjectim(), SMALL_SHARED, SMALL_BASICCNT)
    with pytest.raises(ValueError, match=r"masterordering values must lie in 1\.\.4") as err:
        load_design(tmp_path)
    assert str(path) in str(err.value)


def test_shared_images_must_lead_subjectim(tmp_path):
    subjectim = small_subjectim()
    subjectim[6, [0, 1]] = subjectim[6, [1, 0]]
    path = write_design(tmp_path, SMALL_ORDER, subjectim, SMALL_SHARED, SMALL_BASICCNT)
    with pytest.raises(ValueError, match="sharedix") as err:
        load_design(tmp_path)
    assert str(path) in str(err.value)


def test_subjectim_needs_eight_subjects(tmp_path):
    write_design(tmp_path, SMALL_ORDER, small_subjectim()[:4], SMALL_SHARED, SMALL_BASICCNT)
    with pytest.raises(ValueError, match=r"\(8, n_images\)"):
        load_design(tmp_path)


def test_design_can_be_built_in_memory():
    design = Design(SMALL_ORDER, small_subjectim(), SMALL_SHARED, [5, 4, 3])
    assert design.split(8).test_ids.tolist() == [10, 20]
    with pytest.raises(ValueError, match="do not add up"):
        Design(SMALL_ORDER, small_subjectim(), SMALL_SHARED, [5, 4])


@pytest.mark.parametrize("subject", [1.5, True, False, "1", None, 0, 9])
def test_path_helpers_refuse_what_is_not_a_subject(subject):
    """A fractional or boolean subject must not become subject 1 in a path (Design.trials refuses it too)."""
    from mdlib.nsd import layout

    with pytest.raises(ValueError, match="subject"):
        layout.betas_file(subject, 1)
    with pytest.raises(ValueError, match="subject"):
        layout.roi_file(subject, "nsdgeneral")


def test_path_helpers_take_whole_numbers_of_any_type():
    import numpy as np

    from mdlib.nsd import layout

    assert layout.subj(np.int64(2)) == layout.subj(2.0) == layout.subj(2) == "subj02"
