"""Issue 4: the reward model (train_reward.py) and query selection (collect.py)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import collect
import contract as C
import train_reward


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the stage runs (--threads 1): tiny matrices on two busy cores are many times slower with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args_for(*flags):
    return train_reward.parse_args(["--run", "unused", *flags])


def test_out_of_range_flags_are_refused_in_one_sentence(capsys):
    for flags in (["--random-answer", "1"], ["--members", "0"], ["--target-ratio", "1.5", "1.1"],
                  ["--val-fraction", "-0.1"], ["--dropout", "1"]):
        with pytest.raises(SystemExit):
            args_for(*flags)
        assert f"argument {flags[0]}: value out of range" in capsys.readouterr().err
    assert args_for().members == 3 and args_for().hidden == 64 and args_for().layers == 2  # the paper's
    with pytest.raises(SystemExit):
        args_for("--inputs", "obs+act", "--reward-state", "after")
    assert "argument --reward-state: after needs --inputs obs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the loss

def test_loss_without_random_answers_is_plain_bradley_terry():
    r_left, r_right = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.5, 0.0, 1.0])
    loss = train_reward.preference_loss(r_left, r_right, target, random_answer=0.0)
    # -log sigmoid(1); a tie trained to 0.5/0.5 at equal returns: log 2; -log(1 - sigmoid(3)); log 2
    expected = [0.313262, 0.693147, 3.048587, 0.693147]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_loss_with_ten_percent_random_answers_matches_hand_computed_values():
    r_left, r_right = torch.tensor([1.0, 0.0, 2.0, 40.0]), torch.tensor([0.0, 0.0, -1.0, 0.0])
    target = torch.tensor([1.0, 0.5, 0.0, 0.0])
    loss = train_reward.preference_loss(r_left, r_right, target, random_answer=0.1)
    # P(left) = 0.9 sigmoid(d) + 0.05:  d=1 -> 0.7079527; d=0 -> 0.5; d=3 -> 0.9073167; d=40 -> 0.95
    expected = [0.345378, 0.693147, 2.378567, 2.995732]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # the random-answer floor bounds the loss of a confidently wrong prediction by -log(0.05) ~ 3.0 ...
    assert loss[3] < 3.0
    # ... whereas the plain model pays ~ 40 for it, so one mistaken label would dominate training
    assert train_reward.preference_loss(r_left[3:], r_right[3:], target[3:], 0.0).item() == pytest.approx(40.0)
    # the flag reaches the loss: the default is the paper's 10%
    assert args_for().random_answer == 0.1


# ------------------------------------------------------------------------------- bootstrap and split

def test_each_member_holds_out_one_over_e_and_bootstraps_the_rest():
    n, members = 6000, 3
    is_val, counts = train_reward.split_labels(np.arange(n), members, 1 / math.e, seed=0)
    assert is_val.shape == counts.shape == (members, n)
    for k in range(members):
        assert is_val[k].mean() == pytest.approx(1 / math.e, abs=0.02)  # 2207 of 6000, +-37 at 1 sd
        assert (counts[k][is_val[k]] == 0).all()  # never trains on its validation labels
        train = counts[k][~is_val[k]]
        assert train.sum() == pytest.approx(len(train), rel=0.04)  # a bootstrap sample is as large as the set
        assert (train == 0).mean() == pytest.approx(1 / math.e, abs=0.02)  # and leaves ~1/e of it out
        assert train.max() >= 3  # with repeats
    assert not (is_val[0] == is_val[1]).all() and not (counts[1] == counts[2]).all()  # own split per member
    # a label keeps its role when more labels arrive, so a warm-started member never sees its held-out part
    more_val, more_counts = train_reward.split_labels(np.arange(n + 500), members, 1 / math.e, seed=0)
    np.testing.assert_array_equal(more_val[:, :n], is_val)
    np.testing.assert_array_equal(more_counts[:, :n], counts)


def test_training_steps_follow_the_epochs_flag():
    x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=400)
    pool = counts.sum(1).mean()  # ~ 400 (1 - 1/e) labels in each member's bootstrap sample
    fit = train_reward.fit
    _, _, report = fit(x, left, right, target, is_val, counts, args_for("--epochs", "3", "--min-steps", "1"))
    assert report["steps"] == math.ceil(3 * pool / 64) and report["epochs"] == pytest.approx(3, abs=0.2)
    _, _, report = fit(x, left, right, target, is_val, counts, args_for("--epochs", "3", "--min-steps", "25"))
    assert report["steps"] == 25
    _, _, report = fit(x, left, right, target, is_val, counts, args_for("--steps", "7"))
    assert report["steps"] == 7


def test_a_model_from_scratch_takes_at_least_fresh_min_steps_and_a_warm_started_one_min_steps():
    x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=400)
    args = args_for("--epochs", "1", "--min-steps", "20", "--fresh-min-steps", "60")
    model, l2, report = train_reward.fit(x, left, right, target, is_val, counts, args)
    assert report["steps"] == 60  # from scratch
    _, _, report = train_reward.fit(x, left, right, target, is_val, counts, args, model, l2)
    assert report["steps"] == 20  # warm-started from the model above
    # Without the flag a model from scratch takes --min-steps, as before the flag existed.
    plain = args_for("--epochs", "1", "--min-steps", "20")
    _, _, report = train_reward.fit(x, left, right, target, is_val, counts, plain)
    assert report["steps"] == 20
    # --steps still overrides both, and the flag's range is checked.
    fixed = args_for("--steps", "7", "--fresh-min-steps", "60")
    _, _, report = train_reward.fit(x, left, right, target, is_val, counts, fixed)
    assert report["steps"] == 7
    with pytest.raises(SystemExit):
        args_for("--fresh-min-steps", "0")


def test_fit_copes_with_a_handful_of_labels():
    for n_pairs in (1, 2, 3):  # some members then have no bootstrap sample or no validation part at all
        x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=n_pairs)
        model, l2, report = train_reward.fit(x, left, right, target, is_val, counts, args_for("--steps", "20"))
        assert all(torch.isfinite(w).all() for w in model.weights) and np.isfinite(l2).all()
        assert len(report["ratios"]) == (2 if is_val.any() else 0)  # adapts only with something to validate on


def test_rank_correlation_is_spearmans_with_mean_ranks_for_ties():
    assert train_reward.rank_correlation([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert train_reward.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): co-deviation 4.5 / sqrt(4.5 * 5)
    assert train_reward.rank_correlation([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(train_reward.rank_correlation([1, 2], [2, 1]))


# ------------------------------------------------------------------------------------ adaptive L2

def test_l2_rises_when_validation_loss_runs_away_and_falls_when_it_does_not():
    args = args_for("--target-ratio", "1.1", "1.5", "--l2-factor", "2", "--l2-range", "1e-4", "1")
    l2 = np.array([0.01, 0.01, 0.01, 0.01, 0.6, 1.5e-4])
    ratio = np.array([2.0, 1.3, 1.0, np.nan, 3.0, 0.5])
    # overfitting: up; in range: kept; underfitting: down; no validation labels: kept; within the range
    np.testing.assert_allclose(train_reward.adapt_l2(l2, ratio, args), [0.02, 0.01, 0.005, 0.01, 1.0, 1e-4])


# ------------------------------------------------------------------------------ output normalisation

def test_output_normalisation_gives_each_member_zero_mean_and_unit_std():
    torch.manual_seed(0)
    model = C.build_reward_ensemble(5, members=3, hidden=16, layers=2)
    with torch.no_grad():
        model.weights[-1].mul_(torch.tensor([1.0, 7.0, 0.2])[:, None, None])  # very different scales
        model.biases[-1].add_(torch.tensor([3.0, -10.0, 0.5])[:, None, None])
    x = torch.randn(40, 25, 5) * 2 + 1  # (S, T, D) states of the latest rounds
    train_reward.normalize_output(model, x)
    flat = x.reshape(-1, 5)
    with torch.no_grad():
        each = (model(flat) - model.out_mean[:, None]) / model.out_std[:, None]  # (K, S*T)
        averaged = model.normalized_reward(flat)
    np.testing.assert_allclose(each.mean(1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(each.std(1).numpy(), 1.0, atol=1e-4)
    assert abs(averaged.mean().item()) < 1e-4
    assert 0.3 < averaged.std().item() <= 1.0 + 1e-4  # the average of unit-std members, no larger


# ----------------------------------------------------------------------------- disagreement selection

def test_disagreement_selection_picks_the_pairs_the_members_disagree_on():
    # Members agree on segments 0 and 1 (return 0) and contradict each other on 2 and 3: comparing 2 with 3
    # is where the ensemble's predicted preference varies most (0.98 / 0.02 / 0.5), then 2 or 3 against 0 or 1.
    member_returns = np.array([[0.0, 0.0, 2.0, -2.0],
                               [0.0, 0.0, -2.0, 2.0],
                               [0.0, 0.0, 0.0, 0.0]])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        pairs = collect.select_pairs(4, 1, rng, member_returns, candidates_factor=100)
        assert sorted(pairs[0]) == [2, 3]
        pairs = collect.select_pairs(4, 30, rng, member_returns, candidates_factor=10)
        assert all(2 in p or 3 in p for p in pairs)  # never the pair (0, 1) on which everyone agrees
        assert all(p[0] != p[1] for p in pairs)
    random_pairs = collect.select_pairs(4, 30, np.random.default_rng(0), None)
    assert any(sorted(p) == [0, 1] for p in random_pairs)  # (random selection does ask about it)


def test_disagreement_selection_ranks_by_the_variance_of_predicted_preference():
    rng = np.random.default_rng(1)
    member_returns = rng.normal(size=(3, 8)) * rng.uniform(0, 3, size=8)  # (K, N): 28 possible pairs

    def variance(pairs):  # of P(left > right) across the members
        return (1 / (1 + np.exp(-(member_returns[:, pairs[:, 0]] - member_returns[:, pairs[:, 1]])))).var(0)
    every_pair = np.array([(a, b) for a in range(8) for b in range(a + 1, 8)])
    fifth_most_disputed = np.sort(variance(every_pair))[-5]
    for seed in range(3):  # 1000 candidates draw every one of the 28 pairs, so the kept 5 are among the top 5
        chosen = collect.select_pairs(8, 5, np.random.default_rng(seed), member_returns, candidates_factor=200)
        assert chosen.shape == (5, 2) and (variance(chosen) >= fifth_most_disputed - 1e-12).all()


def test_disagreement_selection_puts_the_earlier_segment_on_either_side():
    """Pairs keep the side their segments were drawn on: were the earlier pool index always on the left, a
    labeler's bias for one side would be a bias for segments from earlier in the rollout."""
    member_returns = np.random.default_rng(0).normal(size=(3, 200))
    pairs = collect.select_pairs(200, 100, np.random.default_rng(0), member_returns)
    assert 30 <= (pairs[:, 0] < pairs[:, 1]).sum() <= 70
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 100  # still each pair once


def test_disagreement_selection_asks_no_pair_twice_even_from_few_candidates():
    """With --candidates-factor 1 the candidates drawn could repeat a pair, and the repeat was asked as well:
    the same question twice, its answer counted twice in training."""
    for seed in range(200):
        rng = np.random.default_rng(seed)
        member_returns = rng.normal(size=(3, 6))
        pairs = collect.select_pairs(6, 3, rng, member_returns, candidates_factor=1)
        assert pairs.shape == (3, 2) and len({tuple(sorted(p)) for p in pairs.tolist()}) == 3, (seed, pairs)


def test_the_first_round_falls_back_to_random_selection_and_says_so(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    argv = ["collect.py", "--run", run, "--env", "HalfCheetah-v5", "--pairs", "3", "--num-envs", "1", "--no-clips",
            "--selection", "disagreement"]
    monkeypatch.setattr(sys, "argv", argv)
    collect.main()
    assert "no reward model yet, so this round's pairs are chosen at random" in capsys.readouterr().out
    torch.manual_seed(0)
    train_reward.save_model(os.path.join(run, C.REWARD_MODEL), C.build_reward_ensemble(17), [0.01] * 3,
                            labels=[{"query_id": i, "choice": "left"} for i in range(3)])
    monkeypatch.setattr(sys, "argv", argv)
    collect.main()
    assert "no reward model" not in capsys.readouterr().out
    assert [q["selection"] for _, q in sorted(C.read_queries(run).items())] == ["random"] * 3 + ["disagreement"] * 3


# ------------------------------------------------------------------------------- fitting, saving

def linear_reward_problem(n_pairs=300, steps=10, dim=6, seed=0):
    """Segments (2 n_pairs, steps, dim) whose true per-step reward is a fixed linear function of the input,
    labelled by the perfect teacher. Returns x, left, right, target, is_val, counts, true_return."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(2 * n_pairs, steps, dim)) + rng.normal(size=(2 * n_pairs, 1, dim))).astype(np.float32)
    true_return = (x @ np.linspace(-1, 1, dim)).sum(1)
    left, right = np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)
    target = (true_return[left] > true_return[right]).astype(np.float32)
    is_val, counts = train_reward.split_labels(np.arange(n_pairs), 3, 1 / math.e, seed)
    return (torch.as_tensor(x), torch.as_tensor(left), torch.as_tensor(right), torch.as_tensor(target), is_val,
            counts, true_return)


def test_fit_learns_a_linear_reward_and_keeps_validation_loss_near_training_loss():
    torch.manual_seed(0)
    x, left, right, target, is_val, counts, true_return = linear_reward_problem()
    args = args_for("--hidden", "32", "--epochs", "40")
    model, l2, report = train_reward.fit(x, left, right, target, is_val, counts, args)
    figures = train_reward.evaluate(model, x, left, right, target, is_val, counts, true_return, 0.1)
    assert (figures["val_accuracy"] > 0.85).all(), figures
    assert (figures["val_return_spearman"] > 0.9).all(), figures
    assert len(report["ratios"]) == report["steps"] // args.adapt_every
    ratio = figures["val_loss"] / figures["train_loss"]
    assert ((ratio > 1.0) & (ratio < 1.7)).all(), ratio  # the paper's 1.1-1.5, give or take the last steps
    assert l2.shape == (3,) and (l2 >= args.l2_range[0]).all() and (l2 <= args.l2_range[1]).all()
    # the same fit without L2 overfits these 300 labels: validation loss ends at 3-4x training loss
    torch.manual_seed(0)
    model, _, _ = train_reward.fit(x, left, right, target, is_val, counts, args_for("--hidden", "32", "--epochs", "40",
                                                                                  "--l2-range", "0", "0"))
    figures = train_reward.evaluate(model, x, left, right, target, is_val, counts, true_return, 0.1)
    assert (figures["val_loss"] / figures["train_loss"] > 2.5).all()


def test_dropout_acts_only_while_fitting_and_the_fit_still_learns():
    """--dropout zeroes hidden units in the training steps only: the model's rewards, and the losses the L2 rule
    compares, are of the whole network, so they are the same on every call."""
    torch.manual_seed(0)
    model = C.build_reward_ensemble(6, hidden=32)
    states = torch.randn(200, 6)
    with torch.no_grad():
        whole = model(states)
        torch.testing.assert_close(model(states), whole, rtol=0, atol=0)  # no dropout unless asked for
        dropped = [model(states, 0.5) for _ in range(2)]
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], whole)
    # inverted dropout: with one hidden layer the output is linear in the dropped units, so the mean over many
    # masks is the whole network's output
    one_layer = C.build_reward_ensemble(6, hidden=32, layers=1)
    with torch.no_grad():
        mean = torch.stack([one_layer(states, 0.5) for _ in range(2000)]).mean(0)
        whole_one = one_layer(states)
    assert (mean - whole_one).abs().mean() < 0.05 * whole_one.abs().mean()

    x, left, right, target, is_val, counts, true_return = linear_reward_problem()
    torch.manual_seed(0)
    model, l2, report = train_reward.fit(x, left, right, target, is_val, counts,
                                         args_for("--hidden", "32", "--epochs", "40", "--dropout", "0.5"))
    figures = train_reward.evaluate(model, x, left, right, target, is_val, counts, true_return, 0.1)
    assert (figures["val_accuracy"] > 0.85).all() and (figures["val_return_spearman"] > 0.9).all(), figures
    with torch.no_grad():
        torch.testing.assert_close(model(states), model(states), rtol=0, atol=0)
    # Only the training steps drop units: each L2 adaptation compares two losses of the whole network.
    model = C.build_reward_ensemble(6, hidden=32)
    seen, forward = [], model.forward
    model.forward = lambda x, dropout=0.0: (seen.append(dropout), forward(x, dropout))[1]
    train_reward.fit(x, left, right, target, is_val, counts, args_for("--steps", "20", "--adapt-every", "5",
                                                                       "--dropout", "0.5"), model, [0.01] * 3)
    assert seen.count(0.5) == 20 and seen.count(0.0) == 2 * 4 and len(seen) == 28
    # --dropout 0 is the fit without the flag, to the last bit
    fits = []
    for flags in ((), ("--dropout", "0")):
        torch.manual_seed(2)
        fits.append(train_reward.fit(x, left, right, target, is_val, counts, args_for("--steps", "30", *flags))[0])
    for (name, a), b in zip(fits[0].state_dict().items(), fits[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_a_saved_ensemble_reloads_and_predicts_the_same_values(tmp_path):
    torch.manual_seed(1)
    x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=60)
    model, l2, _ = train_reward.fit(x, left, right, target, is_val, counts, args_for("--steps", "20"))
    train_reward.normalize_output(model, x)
    train_reward.save_model(str(tmp_path / C.REWARD_MODEL), model, l2,
                            labels=[{"query_id": i, "choice": "right"} for i in range(60)])
    loaded = C.load_reward_model(str(tmp_path))
    assert (loaded.members, loaded.hidden, loaded.layers, loaded.in_dim) == (3, 64, 2, 6)
    states = torch.randn(500, 6) * 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(states), model(states), rtol=0, atol=0)
        torch.testing.assert_close(loaded.normalized_reward(states), model.normalized_reward(states), rtol=0, atol=0)
        assert model(states).std(0).mean() > 1e-3  # the members really differ: a real ensemble was saved
    checkpoint = torch.load(tmp_path / C.REWARD_MODEL, weights_only=False)
    assert checkpoint["l2"] == pytest.approx(list(l2)) and checkpoint["labels"] == 60


def test_fit_takes_torch_adams_steps_to_the_last_bit(monkeypatch):
    """train_reward.py's fit steps with contract.FlatAdam, not torch.optim.Adam (whose first call imports
    torch._dynamo, seconds of every round's start): the same fit with torch.optim.Adam in its place ends with
    the same weights and L2 coefficients, bit for bit, so the change moved no figure of BENCHMARKS.md."""
    x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=60, dim=17)
    args = args_for("--steps", "30")  # three L2 adaptations on the way

    def fit():
        torch.manual_seed(3)
        model, l2, _ = train_reward.fit(x, left, right, target, is_val, counts, args, seed=3)
        return {k: v.clone() for k, v in model.state_dict().items()}, list(l2)

    flat_weights, flat_l2 = fit()
    monkeypatch.setattr(C, "FlatAdam", lambda module, lr, eps: torch.optim.Adam(module.parameters(), lr=lr, eps=eps))
    torch_weights, torch_l2 = fit()
    assert flat_l2 == torch_l2
    for name, tensor in torch_weights.items():
        assert torch.equal(flat_weights[name], tensor), name


def test_the_stage_trains_logs_its_figures_and_warm_starts(tmp_path, monkeypatch, capsys):
    """train_reward.py's main() on a run written by hand: two rounds of segments whose true reward is obs[0]."""
    run = str(tmp_path / "run")
    C.open_run(run, "HalfCheetah-v5", seed=0)
    rng = np.random.default_rng(0)
    n, t = 80, 30
    obs, acts = [], []
    for round_index, shift in ((0, 0.0), (1, 2.0)):  # the later round visits other states
        o = (rng.normal(size=(n, t, 17)) + rng.normal(size=(n, 1, 17)) + shift).astype(np.float32)
        a = rng.uniform(-1, 1, size=(n, t, 6)).astype(np.float32)
        ids = np.arange(n) + round_index * n
        C.save_segments(run, round_index, {"ids": ids, "obs": o, "acts": a, "rewards": o[:, :, 0].copy(),
                                           "qpos": np.zeros((n, t, 9)), "qvel": np.zeros((n, t, 9)),
                                           "policy_step": np.zeros(n, np.int64)})
        obs.append(o)
        acts.append(a)
    obs, acts = np.concatenate(obs), np.concatenate(acts)
    queries = [{"query_id": i, "left": 2 * i, "right": 2 * i + 1} for i in range(n)]
    C.append_jsonl(os.path.join(run, C.QUERIES), queries)
    returns = obs[:, :, 0].sum(1)
    C.append_jsonl(os.path.join(run, C.LABELS), [
        {"query_id": q["query_id"], "labeler": "oracle", "time": 1.0,
         "choice": "left" if returns[q["left"]] > returns[q["right"]] else "right"} for q in queries])
    argv = ["train_reward.py", "--run", run, "--steps", "100", "--normalize-rounds", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    train_reward.main()
    first = C.load_reward_model(run)
    monkeypatch.setattr(sys, "argv", argv)
    train_reward.main()  # the second round warm-starts from the first
    logs = [m for m in C.read_jsonl(os.path.join(run, C.METRICS)) if m["stage"] == "train_reward"]
    assert len(logs) == 2
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_return_spearman", "l2",
                "val_train_ratio", "ratio_in_range", "steps", "epochs", "labels", "seconds"):
        assert key in logs[-1], key
    assert logs[-1]["labels"] == n and logs[-1]["steps"] == 100 and len(logs[-1]["l2"]) == 3
    assert logs[-1]["val_accuracy"] > 0.65 and logs[-1]["val_return_spearman"] > 0.5, logs[-1]
    assert logs[-1]["val_loss"] < logs[0]["val_loss"] + 0.05  # warm start continues, it does not restart
    model = C.load_reward_model(run)
    torch.testing.assert_close(model.in_mean, first.in_mean)  # input normalisation kept from the first round
    with torch.no_grad():
        latest = model.normalized_reward(torch.as_tensor(C.reward_input(obs[n:], acts[n:], "obs")).reshape(-1, 17))
        members = (model(torch.as_tensor(C.reward_input(obs[n:], acts[n:], "obs")).reshape(-1, 17)) -
                   model.out_mean[:, None]) / model.out_std[:, None]
    assert abs(latest.mean().item()) < 1e-3  # normalised over the latest round's states (--normalize-rounds 1)
    np.testing.assert_allclose(members.std(1).numpy(), 1.0, atol=1e-3)
    assert json.dumps(logs[-1])  # the log is plain JSON

    # --if-new-labels (loop.sh, once the budget is spent): the same answers leave the model as it is ...
    path = os.path.join(run, C.REWARD_MODEL)
    saved = open(path, "rb").read()
    monkeypatch.setattr(sys, "argv", argv + ["--if-new-labels"])
    train_reward.main()
    assert "no new labels since reward_model.pt was fitted (80)" in capsys.readouterr().out
    assert open(path, "rb").read() == saved and len(C.read_jsonl(os.path.join(run, C.METRICS))) == len(logs)
    # ... but a changed answer is new, though the count stays: it withdraws one answer and gives the other.
    flipped = C.read_labels(run)[0]
    C.append_jsonl(os.path.join(run, C.LABELS), [
        {"query_id": 0, "labeler": "oracle", "undo": True},
        {**flipped, "choice": "right" if flipped["choice"] == "left" else "left"}])
    monkeypatch.setattr(sys, "argv", argv + ["--if-new-labels"])
    train_reward.main()
    assert "80 labels, 100 steps" in capsys.readouterr().out and open(path, "rb").read() != saved


@pytest.mark.slow
def test_reward_inputs_are_the_observation_by_default_or_also_the_action(tmp_path, monkeypatch):
    obs, acts = np.ones((4, 3, 17)), np.zeros((4, 3, 6))
    assert C.reward_input(obs, acts, "obs").shape == (4, 3, 17)
    assert C.reward_input(obs, acts, "obs+act").shape == (4, 3, 23)
    assert C.reward_input(obs, acts, "obs").dtype == np.float32

    run = str(tmp_path / "run")
    C.open_run(run, "HalfCheetah-v5", seed=0)
    rng = np.random.default_rng(0)
    n, t = 150, 30  # a HalfCheetah run's segments: 1.5 s of 0.05 s steps
    o = rng.normal(size=(2 * n, t, 17)).astype(np.float32)
    a = rng.uniform(-1, 1, size=(2 * n, t, 6)).astype(np.float32)
    C.save_segments(run, 0, {"ids": np.arange(2 * n), "obs": o, "acts": a, "rewards": a[:, :, 0].copy(),
                             "qpos": np.zeros((2 * n, t, 9)), "qvel": np.zeros((2 * n, t, 9)),
                             "policy_step": np.zeros(2 * n, np.int64)})
    C.append_jsonl(os.path.join(run, C.QUERIES), [{"query_id": i, "left": 2 * i, "right": 2 * i + 1}
                                                  for i in range(n)])
    returns = a[:, :, 0].sum(1)  # a reward only the action shows
    C.append_jsonl(os.path.join(run, C.LABELS), [
        {"query_id": i, "labeler": "oracle", "time": 1.0,
         "choice": "left" if returns[2 * i] > returns[2 * i + 1] else "right"} for i in range(n)])

    def train(*flags):
        monkeypatch.setattr(sys, "argv", ["train_reward.py", "--run", run, "--steps", "600", *flags])
        train_reward.main()
        return C.load_reward_model(run), C.read_jsonl(os.path.join(run, C.METRICS))[-1]

    model, log = train()
    assert (model.inputs, model.in_dim) == ("obs", 17) and log["val_accuracy"] < 0.65  # it cannot see the action
    model, log = train("--inputs", "obs+act")
    assert (model.inputs, model.in_dim) == ("obs+act", 23) and log["val_accuracy"] > 0.75

    # A model saved before the inputs were a choice saw the action.
    path = os.path.join(run, C.REWARD_MODEL)
    checkpoint = C.load_torch(path, "reward model")
    del checkpoint["inputs"]
    C.save_torch_atomic(path, checkpoint)
    assert C.load_reward_model(run).inputs == "obs+act"


@pytest.mark.slow
def test_a_model_of_a_step_s_two_states_learns_a_reward_of_where_it_led(tmp_path, monkeypatch, capsys):
    """--inputs obs+next sees (obs[t], next_obs[t]): a reward of where each step led, which the observation a
    step starts from does not tell here (drawn apart from it), is learned by it and not by a model of obs."""
    rng = np.random.default_rng(0)
    n, t = 150, 30
    o = rng.normal(size=(2 * n, t, 17)).astype(np.float32)
    led_to = rng.normal(size=(2 * n, t, 17)).astype(np.float32)
    segments = {"ids": np.arange(2 * n), "obs": o, "acts": np.zeros((2 * n, t, 6), np.float32),
                "rewards": led_to[:, :, 0].copy(), "qpos": np.zeros((2 * n, t, 9)), "qvel": np.zeros((2 * n, t, 9)),
                "policy_step": np.zeros(2 * n, np.int64), "next_obs": led_to}
    returns = led_to[:, :, 0].sum(1)

    def run_with(name, segments):
        run = str(tmp_path / name)
        C.open_run(run, "HalfCheetah-v5", seed=0)
        C.save_segments(run, 0, segments)
        C.append_jsonl(os.path.join(run, C.QUERIES), [{"query_id": i, "left": 2 * i, "right": 2 * i + 1}
                                                      for i in range(n)])
        C.append_jsonl(os.path.join(run, C.LABELS), [
            {"query_id": i, "labeler": "oracle", "time": 1.0,
             "choice": "left" if returns[2 * i] > returns[2 * i + 1] else "right"} for i in range(n)])
        return run

    def train(run, *flags):
        monkeypatch.setattr(sys, "argv", ["train_reward.py", "--run", run, "--steps", "600", *flags])
        train_reward.main()
        return C.load_reward_model(run), C.read_jsonl(os.path.join(run, C.METRICS))[-1]

    run = run_with("run", segments)
    np.testing.assert_array_equal(C.load_segments(run)["next_obs"], led_to)
    model, log = train(run)
    assert model.inputs == "obs" and log["val_accuracy"] < 0.65
    model, log = train(run, "--inputs", "obs+next")
    assert (model.inputs, model.in_dim) == ("obs+next", 34) and log["val_accuracy"] > 0.7
    # Disagreement selection sums the same rewards the model was fitted to: of both states of each step.
    with torch.no_grad():
        expected = model(torch.as_tensor(np.concatenate([o, led_to], -1)).reshape(-1, 34)).reshape(3, 2 * n, t)
    np.testing.assert_allclose(collect.segment_returns_per_member(model, segments), expected.sum(-1).numpy(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # it is always given both: --reward-state after is for a model of obs
        train_reward.parse_args(["--run", run, "--inputs", "obs+next", "--reward-state", "after"])
    assert "both states of a step" in capsys.readouterr().err

    # Segment files of before next_obs was stored cannot feed it, and say so; a file's next_obs of the wrong
    # shape is another run's.
    old = run_with("old", {k: v for k, v in segments.items() if k != "next_obs"})
    assert "next_obs" not in C.load_segments(old)
    with pytest.raises(C.UserError, match="segment files written before 2026-12-02 do not store"):
        train(old, "--inputs", "obs+next")
    model, log = train(old)  # a model of the observation alone still trains on them
    assert model.inputs == "obs"
    wrong = run_with("wrong", {**segments, "next_obs": led_to[:, :, :5]})
    with pytest.raises(C.UserError, match="next_obs has shape"):
        C.load_segments(wrong)

def test_fitted_to_the_states_the_steps_led_to_a_segment_s_first_state_is_not_used(tmp_path, monkeypatch):
    """--reward-state after fits a model of the observation to obs[:, 1:], the states each step's action led
    to (train_policy.py --reward-state after rewards a step for those): two runs whose segments differ only in
    their first states get the same model; fitted to the states the steps started from they do not."""
    rng = np.random.default_rng(0)
    n, t = 60, 30
    o = rng.normal(size=(2 * n, t, 17)).astype(np.float32)
    a = rng.uniform(-1, 1, size=(2 * n, t, 6)).astype(np.float32)
    returns = o[:, 1:, 0].sum(1)
    scrambled = o.copy()
    scrambled[:, 0] = rng.normal(size=(2 * n, 17)) * 5

    def fitted(name, obs, *flags):
        run = str(tmp_path / name)
        C.open_run(run, "HalfCheetah-v5", seed=0)
        C.save_segments(run, 0, {"ids": np.arange(2 * n), "obs": obs, "acts": a, "rewards": o[:, :, 0].copy(),
                                 "qpos": np.zeros((2 * n, t, 9)), "qvel": np.zeros((2 * n, t, 9)),
                                 "policy_step": np.zeros(2 * n, np.int64)})
        C.append_jsonl(os.path.join(run, C.QUERIES), [{"query_id": i, "left": 2 * i, "right": 2 * i + 1}
                                                      for i in range(n)])
        C.append_jsonl(os.path.join(run, C.LABELS), [
            {"query_id": i, "labeler": "oracle", "time": 1.0,
             "choice": "left" if returns[2 * i] > returns[2 * i + 1] else "right"} for i in range(n)])
        monkeypatch.setattr(sys, "argv", ["train_reward.py", "--run", run, "--steps", "50", *flags])
        train_reward.main()
        return C.load_reward_model(run).state_dict()

    def same(a_model, b_model):
        return all(torch.equal(a_model[k], b_model[k]) for k in a_model)

    after = ("--reward-state", "after")
    assert same(fitted("after", o, *after), fitted("after-scrambled", scrambled, *after))
    assert not same(fitted("before", o), fitted("before-scrambled", scrambled))
    # The model records which states it was fitted to (train_policy.py and collect.py use it the same way);
    # a file written before it did was fitted to the states the steps started from.
    assert C.load_reward_model(str(tmp_path / "after")).reward_state == "after"
    assert C.load_reward_model(str(tmp_path / "before")).reward_state == "before"
    path = str(tmp_path / "after" / C.REWARD_MODEL)
    checkpoint = C.load_torch(path, "reward model")
    del checkpoint["reward_state"]
    C.save_torch_atomic(path, checkpoint)
    assert C.load_reward_model(str(tmp_path / "after")).reward_state == "before"
    # Asked for the other state with no new labels, --if-new-labels still refits: the model would not match.
    monkeypatch.setattr(sys, "argv", ["train_reward.py", "--run", str(tmp_path / "before"), "--steps", "50",
                                      "--if-new-labels", *after])
    train_reward.main()
    assert C.load_reward_model(str(tmp_path / "before")).reward_state == "after"


def test_segment_reward_input_drops_the_first_state_only_for_a_model_of_the_state_after():
    obs, acts = np.arange(2 * 4 * 3).reshape(2, 4, 3), np.ones((2, 4, 1))
    np.testing.assert_array_equal(C.segment_reward_input(obs, acts, "obs", "before"), obs)
    np.testing.assert_array_equal(C.segment_reward_input(obs, acts, "obs", "after"), obs[:, 1:])
    assert C.segment_reward_input(obs, acts, "obs+act", "after").shape == (2, 4, 4)
    # The one rule the trainer, the policy's rollouts and the scoring bench share: only "obs" can reward "after".
    led_to = {(i, s) for i in C.REWARD_INPUTS for s in C.REWARD_STATES if C.rewards_led_to_state(i, s)}
    assert led_to == {("obs", "after")}

    # Disagreement selection sums a model's rewards over the same states it was fitted to.
    torch.manual_seed(0)
    pool = {"obs": np.random.default_rng(0).normal(size=(5, 4, 3)), "acts": np.zeros((5, 4, 1))}
    for state, states in (("before", pool["obs"]), ("after", pool["obs"][:, 1:])):
        model = C.build_reward_ensemble(3, members=2, reward_state=state)
        with torch.no_grad():
            expected = model(torch.as_tensor(states, dtype=torch.float32).reshape(-1, 3)).reshape(2, 5, -1).sum(-1)
        np.testing.assert_allclose(collect.segment_returns_per_member(model, pool), expected.numpy(), rtol=1e-5)


def test_fit_keeps_the_l2_coefficients_within_the_range_it_is_given_from_the_first_step():
    """A starting --l2, or a warm-started model's coefficients, outside --l2-range are clipped into it at once,
    not only at the first adaptation (which never comes without validation labels)."""
    torch.manual_seed(0)
    x, left, right, target, is_val, counts, _ = linear_reward_problem(n_pairs=20)
    no_val = np.zeros_like(is_val)
    _, l2, report = train_reward.fit(x, left, right, target, no_val, counts,
                                     args_for("--steps", "5", "--l2-range", "1e-5", "0.001"))
    assert not report["ratios"] and (l2 == 0.001).all()  # --l2's default 0.01, clipped
    model, _, _ = train_reward.fit(x, left, right, target, is_val, counts, args_for("--steps", "5"))
    _, l2, _ = train_reward.fit(x, left, right, target, no_val, counts,
                                args_for("--steps", "5", "--l2-range", "0.5", "1"), model, [0.3, 0.7, 2.0])
    assert l2.tolist() == [0.5, 0.7, 1.0]


def test_renormalizing_the_inputs_leaves_the_reward_as_it_was():
    """train_reward.py --renormalize-inputs gives a warm-started model the input normalisation of the current
    segments and rescales its first layer, so that the refit starts from the very function the last fit ended
    with."""
    torch.manual_seed(0)
    model = C.build_reward_ensemble(5, members=3)
    model.in_mean.copy_(torch.randn(5))
    model.in_std.copy_(torch.rand(5) + 0.5)
    x = torch.randn(200, 5) * 3 + 1  # states far from those the normalisation was taken from
    with torch.no_grad():
        before = model(x)
        train_reward.renormalize_inputs(model, x.mean(0), x.std(0))
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.in_mean, x.mean(0))
    torch.testing.assert_close(((x - model.in_mean) / model.in_std).std(0), torch.ones(5))


def test_a_refit_takes_the_new_input_normalisation_only_with_the_flag():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5) * 2 + 3  # 6 segments of 4 steps
    left, right, target = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([1.0, 0.0, 1.0])
    is_val, counts = train_reward.split_labels([0, 1, 2], 3, 0.0, 0)
    for flags, renormalized in [([], False), (["--renormalize-inputs"], True)]:
        args = train_reward.parse_args(["--run", "unused", "--steps", "1", *flags])
        model = C.build_reward_ensemble(5, members=3)  # a saved model, normalised for other states
        model, _, _ = train_reward.fit(x, left, right, target, is_val, counts, args, model, [0.01] * 3)
        assert torch.allclose(model.in_mean, x.reshape(-1, 5).mean(0)) == renormalized
        assert torch.equal(model.in_mean, torch.zeros(5)) != renormalized
