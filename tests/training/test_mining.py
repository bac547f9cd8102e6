"""Score bank and the soft mining scheme."""

import numpy as np
import pytest
import torch

from cdface.training.mining import ScoreBank, SoftMiner, identities_per_rank


def make_bank(scores):
    bank = ScoreBank(len(scores))
    bank.scores = torch.tensor(scores, dtype=torch.float32)
    return bank


def test_bank_is_an_exponential_moving_average():
    bank = ScoreBank(4, alpha=0.9)
    bank.update(torch.tensor([1, 3]), torch.tensor([0.5, -0.2]))
    bank.update(torch.tensor([1]), torch.tensor([1.0]))
    expected = [0.0, 0.9 * (0.1 * 0.5) + 0.1 * 1.0, 0.0, 0.1 * -0.2]
    torch.testing.assert_close(bank.scores, torch.tensor(expected))
    assert bank.updates.tolist() == [0, 2, 0, 1]


def test_bank_threshold_is_the_quantile():
    bank = make_bank(np.arange(100) / 100.0)
    assert bank.threshold(0.2) == pytest.approx(0.19)


def test_bank_state_round_trip_and_size_check():
    bank = make_bank([0.1, 0.2, 0.3])
    other = ScoreBank(3)
    other.load_state_dict(bank.state_dict())
    torch.testing.assert_close(other.scores, bank.scores)
    with pytest.raises(ValueError):
        ScoreBank(4).load_state_dict(bank.state_dict())


def _identity_block(n_per_identity):
    return np.repeat(np.arange(len(n_per_identity)), n_per_identity)


def test_easy_above_and_hard_below_threshold_when_available():
    labels = _identity_block([20, 20, 20])
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.2, 0.8, size=labels.size)
    bank = make_bank(scores)
    miner = SoftMiner(labels, num_identities=3, num_easy=7, num_hard=1, quantile=0.2, seed=0)
    mined = miner.mine(bank, torch.tensor([0, 1, 2, 2]), step=0)
    t = mined.threshold
    assert t == pytest.approx(bank.threshold(0.2))
    for row in range(3):
        ident = int(mined.identities[row])
        members = set(np.flatnonzero(labels == ident))
        below = [i for i in members if scores[i] < t]
        above = [i for i in members if scores[i] >= t]
        assert len(below) >= 1 and len(above) >= 7  # this fixture needs no widening
        assert set(mined.hard[row].tolist()) <= set(below)
        assert set(mined.easy[row].tolist()) <= set(above)
        assert len(set(mined.easy[row].tolist())) == 7  # no repetition while the identity has enough


def test_window_widens_by_step_when_an_identity_is_short():
    # Identity 0: every score far above the bank threshold, so no hard sample exists below it.
    # Identity 1: almost every score below it, so too few easy samples.
    scores0 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.47, 0.45, 0.44, 0.43, 0.33]
    scores1 = [0.31, 0.27, 0.24, 0.22, 0.21, 0.2, 0.19, 0.12, 0.11, 0.35]
    filler = [0.3] * 80
    labels = np.concatenate([_identity_block([10, 10]), np.repeat([2], 80)])
    bank = make_bank(scores0 + scores1 + filler)
    miner = SoftMiner(labels, num_identities=2, num_easy=7, num_hard=1, quantile=0.2, widen_step=0.05, seed=3)
    mined = miner.mine(bank, torch.tensor([0, 1]), step=0, threshold=0.3)
    # hard side of identity 0: lowest score 0.33 >= 0.3 -> window widens to [.., 0.35): only 0.33 fits
    assert mined.hard[0].tolist() == [9]
    # easy side of identity 1: after its hard sample is taken, the window [0.3 - w, ..) widens in
    # 0.05 steps just until it holds 7 of the remaining samples
    hard1 = int(mined.hard[1]) - 10
    assert scores1[hard1] < 0.3
    rest = sorted((s for i, s in enumerate(scores1) if i != hard1), reverse=True)
    steps = int(np.ceil((0.3 - rest[6]) / 0.05 - 1e-6))
    lower = 0.3 - steps * 0.05
    easy1 = [s - 10 for s in mined.easy[1].tolist()]
    assert steps >= 2 and all(scores1[i] >= lower - 1e-6 for i in easy1)
    assert len(set(easy1)) == 7 and hard1 not in easy1


def test_never_mixes_identities_and_repeats_only_when_short():
    labels = _identity_block([3, 12, 8, 30, 1])
    bank = make_bank(np.random.default_rng(1).uniform(0, 1, labels.size))
    miner = SoftMiner(labels, num_identities=5, num_easy=7, num_hard=1, seed=0)
    mined = miner.mine(bank, torch.arange(5), step=7)
    for row in range(5):
        ident = int(mined.identities[row])
        chosen = mined.easy[row].tolist() + mined.hard[row].tolist()
        assert set(labels[chosen]) == {ident}
        size = int((labels == ident).sum())
        distinct = len(set(chosen))
        assert distinct == min(size, 8)  # repetition only when the identity has fewer than NE + NH


def test_mining_is_deterministic_for_a_seed_and_varies_with_it():
    labels = _identity_block([15] * 30)
    bank = make_bank(np.random.default_rng(2).uniform(0, 1, labels.size))
    batch = torch.from_numpy(labels[::3].copy())
    a = SoftMiner(labels, 8, seed=11).mine(bank, batch, step=5)
    b = SoftMiner(labels, 8, seed=11).mine(bank, batch, step=5)
    c = SoftMiner(labels, 8, seed=12).mine(bank, batch, step=5)
    assert torch.equal(a.sample_indices, b.sample_indices) and torch.equal(a.identities, b.identities)
    assert not torch.equal(a.sample_indices, c.sample_indices)


def test_identities_come_from_the_batch_and_batch_positions_point_at_them():
    labels = _identity_block([10] * 20)
    bank = make_bank(np.random.default_rng(3).uniform(0, 1, labels.size))
    batch = torch.tensor([4, 7, 7, 19, 2, 4, 11])
    mined = SoftMiner(labels, 4, seed=0).mine(bank, batch, step=1)
    assert set(mined.identities.tolist()) <= {4, 7, 19, 2, 11}
    assert torch.equal(batch[mined.batch_positions], mined.identities)
    # fewer identities in the batch than K: take all of them
    few = SoftMiner(labels, 4, seed=0).mine(bank, torch.tensor([3, 3, 5]), step=1)
    assert few.identities.tolist() == [3, 5]


def test_rank_split_covers_k_exactly():
    for k in (64, 7, 1):
        for world in (1, 2, 3, 8):
            shares = [identities_per_rank(k, world, r) for r in range(world)]
            assert sum(shares) == k and max(shares) - min(shares) <= 1


def test_per_rank_miners_draw_from_their_own_batches():
    labels = _identity_block([10] * 40)
    bank = make_bank(np.random.default_rng(4).uniform(0, 1, labels.size))
    world = 2
    batches = [torch.arange(0, 20), torch.arange(20, 40)]
    mined = [SoftMiner(labels, identities_per_rank(16, world, r), seed=0).mine(bank, batches[r], step=0, rank=r)
             for r in range(world)]
    assert sum(m.identities.numel() for m in mined) == 16
    for r in range(world):
        assert set(mined[r].identities.tolist()) <= set(batches[r].tolist())


def test_num_easy_below_two_is_refused():
    with pytest.raises(ValueError, match="NE >= 2"):
        SoftMiner(np.zeros(4, dtype=np.int64), 1, num_easy=1)
