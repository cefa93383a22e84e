"""Stage 3 of the loop: fit the reward model r(obs) (or the paper's r(obs, action)) to the teacher's preferences.

The model is an ensemble of small MLPs (the paper's: 2 hidden layers of 64, leaky ReLU). Each member is
fitted on its own bootstrap resample of the labels and holds out its own 1/e of them for validation. The
probability that the teacher prefers the left segment is modelled as (Bradley-Terry)

    P(left > right) = (1 - eps) * sigmoid(sum_t r(left_t) - sum_t r(right_t)) + eps / 2

where eps (default 0.1) is the chance that the teacher answered at random. `equal` trains towards 0.5/0.5,
`skip` is not trained on. Each member's L2 coefficient is adapted during training so that its validation
loss stays within 1.1-1.5x its training loss (the paper's rule; the coefficients carry over to the next
round). A call trains --epochs passes over the labels, but at least --min-steps steps: ~50 L2 adaptations,
which the rule needs to settle from where the last round left it (--fresh-min-steps, where given, for a model
that starts from scratch). --dropout drops hidden units in each step, as rl-teacher's model did. Training
warm-starts from the previous round's model; with --if-new-labels a call does nothing if that model was fitted
to exactly these answers. Finally each member's output is normalised to zero mean and unit standard deviation
over the states of the latest rounds; the policy is rewarded with the average of the normalised members.

    python train_reward.py --run data/cheetah

Reads: config.json, segments/, queries.jsonl, labels.jsonl, reward_model.pt.
Writes: reward_model.pt, metrics.jsonl.
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch

import contract as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--inputs", choices=C.REWARD_INPUTS, default="obs",
                   help="what the model sees: the observation, as a person watching a clip does, or also the "
                        "action (the paper's r(o, a)), or a step's two observations, the one it started from and "
                        "the one it led to (obs+next); see contract.REWARD_INPUTS")
    p.add_argument("--members", type=int, default=3, help="ensemble size")
    p.add_argument("--reward-state", choices=C.REWARD_STATES, default="before",
                   help="a model of the observation alone rewards a step for the state it started from (before) "
                        "or for the state it led to (after; fitted to T-1 of a segment's T steps, as models fitted "
                        "before segments stored next_obs were); recorded in the model, which "
                        "train_policy.py and collect.py then use the same way; see contract.REWARD_STATES")
    p.add_argument("--hidden", type=int, default=64, help="hidden layer width")
    p.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    p.add_argument("--epochs", type=float, default=30,
                   help="passes over each member's bootstrap sample this call (sets the number of steps)")
    p.add_argument("--min-steps", type=int, default=500, help="at least this many gradient steps")
    p.add_argument("--fresh-min-steps", type=int, default=None,
                   help="at least this many gradient steps when the model starts from scratch (the first round, "
                        "--fresh, a changed architecture) instead of from the last round's; default: --min-steps")
    p.add_argument("--steps", type=int, default=None, help="gradient steps this call; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=64, help="labelled pairs per member per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--random-answer", type=float, default=0.1,
                   help="assumed probability that the teacher answered uniformly at random")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="share of hidden units dropped in each training step (rl-teacher's model: 0.5); the L2 rule "
                        "and every use of the model see the whole network")
    p.add_argument("--val-fraction", type=float, default=float(1 / np.e), help="share held out per member")
    p.add_argument("--l2", type=float, default=1e-2, help="initial L2 coefficient (then adapted)")
    p.add_argument("--l2-range", type=float, nargs=2, default=[1e-5, 1.0], help="bounds of the adapted L2")
    p.add_argument("--l2-factor", type=float, default=1.3, help="L2 is multiplied or divided by this")
    p.add_argument("--target-ratio", type=float, nargs=2, default=[1.1, 1.5],
                   help="validation/training loss range that L2 adaptation aims for")
    p.add_argument("--adapt-every", type=int, default=10, help="steps between L2 adaptations")
    p.add_argument("--normalize-rounds", type=int, default=3,
                   help="normalise each member's output over the states of this many latest rounds")
    p.add_argument("--renormalize-inputs", action="store_true",
                   help="a warm-started model takes its input normalisation anew from all segments on every refit "
                        "(its first layer rescaled so that it computes the same reward), instead of keeping the "
                        "random policy's of the first fit, which later states lie several std away from")
    p.add_argument("--fresh", action="store_true", help="start from a new model instead of the saved one")
    p.add_argument("--if-new-labels", action="store_true",
                   help="do nothing if the saved model was fitted to exactly these labels (loop.sh: once the "
                        "label budget is spent, the agent's reward stops changing)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (small nets: 1 is fastest)")
    args = p.parse_args(argv)
    # A mistyped flag is one sentence now rather than a traceback or a silent NaN loss later.
    rules = {"--members": args.members >= 1, "--hidden": args.hidden >= 1, "--layers": args.layers >= 1,
             "--epochs": 0 < args.epochs < np.inf, "--seed": args.seed is None or args.seed >= 0,
             "--min-steps": args.min_steps >= 1, "--batch-size": args.batch_size >= 1,
             "--fresh-min-steps": args.fresh_min_steps is None or args.fresh_min_steps >= 1,
             # (upper bounds: inf fits a NaN model without an error, 1e308 overflows torch's float32)
             "--steps": args.steps is None or args.steps >= 1, "--lr": 0 < args.lr <= 1,
             "--random-answer": 0 <= args.random_answer < 1, "--dropout": 0 <= args.dropout < 1,
             "--val-fraction": 0 <= args.val_fraction < 1,
             "--l2": 0 <= args.l2 < 1e6, "--l2-range": 0 <= args.l2_range[0] <= args.l2_range[1] < 1e6,
             "--l2-factor": 1 <= args.l2_factor < 1e6,
             "--target-ratio": 0 < args.target_ratio[0] <= args.target_ratio[1] < 1e6,
             "--adapt-every": args.adapt_every >= 1, "--normalize-rounds": args.normalize_rounds >= 1,
             "--threads": args.threads >= 1}
    for flag, ok in rules.items():
        if not ok:
            p.error(f"argument {flag}: value out of range (see --help)")
    if args.reward_state == "after" and args.inputs != "obs":
        p.error("argument --reward-state: after needs --inputs obs (a model that also sees the action, or both "
                "states of a step, is given the state the step started from)")
    return args


def preference_loss(r_left, r_right, target, random_answer):
    """Cross-entropy of the teacher's answer under the Bradley-Terry model with a random-answer floor.

    r_left, r_right: predicted segment returns (...,); target: P(left preferred) in {0, 0.5, 1} (...,).
    Returns the per-pair loss (...,). Computed in log space, so that a confident mistake costs its full
    (large but finite) loss also without the random-answer floor instead of log(0)."""
    d = r_left - r_right
    floor = torch.tensor(random_answer / 2).log()  # -inf when random_answer = 0: logaddexp ignores it
    scale = torch.tensor(1 - random_answer).log()
    log_p_left = torch.logaddexp(scale + torch.nn.functional.logsigmoid(d), floor)
    log_p_right = torch.logaddexp(scale + torch.nn.functional.logsigmoid(-d), floor)
    return -(target * log_p_left + (1 - target) * log_p_right)


def label_tensors(labels, queries, index):
    """The pairs the labels answer, as (left, right, target), each (N,): indices into the segments (index maps a
    segment id to its row) and P(left preferred)."""
    left = torch.as_tensor([index[queries[l["query_id"]]["left"]] for l in labels])
    right = torch.as_tensor([index[queries[l["query_id"]]["right"]] for l in labels])
    target = torch.as_tensor([C.preference_target(l["choice"]) for l in labels], dtype=torch.float32)
    return left, right, target


def split_labels(query_ids, members, val_fraction, seed):
    """Per member, which labels it validates on and how often each other label is in its bootstrap sample.

    query_ids: (N,). Returns (is_val (K, N) bool, counts (K, N) int). A Poisson(1) count per label is the
    usual streaming form of a bootstrap resample (multinomial counts for large N). Both depend only on
    (seed, query id, member), so a label keeps its role from round to round: a warm-started member never
    trains on what it validated on before."""
    is_val = np.zeros((members, len(query_ids)), bool)
    counts = np.zeros((members, len(query_ids)), np.int64)
    for j, qid in enumerate(query_ids):
        for k in range(members):
            rng = np.random.default_rng([seed, int(qid), k])
            is_val[k, j] = rng.random() < val_fraction
            counts[k, j] = 0 if is_val[k, j] else rng.poisson(1.0)
    return is_val, counts


def segment_returns(model, x, dropout=0.0):
    """x: (K, B, T, D) each member's own segments -> (K, B) their predicted returns (with dropout, see
    RewardEnsemble.forward)."""
    k, b, t, d = x.shape
    return model(x.reshape(k, b * t, d), dropout).reshape(k, b, t).sum(-1)


def all_segment_returns(model, x, chunk=256):
    """x: (S, T, D) -> (K, S) every member's predicted return of every segment, without gradients."""
    with torch.no_grad():
        return torch.cat([segment_returns(model, x[i:i + chunk].unsqueeze(0).expand(model.members, -1, -1, -1))
                          for i in range(0, len(x), chunk)], dim=1)


def member_metrics(seg_return, left, right, target, weight, random_answer):
    """Loss and accuracy per member from predicted returns seg_return (K, S) of the pairs (left, right (N,)
    indices into S, target (N,)), each pair weighted by weight (K, N) (0 = not counted). Accuracy counts only
    pairs with a strict preference. Returns (loss (K,), accuracy (K,)), NaN where a member has no pairs."""
    r_left, r_right = seg_return[:, left], seg_return[:, right]
    loss = preference_loss(r_left, r_right, target, random_answer).numpy()
    correct = ((r_left > r_right) == (target > 0.5)).numpy()
    strict = weight * (target != 0.5).numpy()
    with np.errstate(invalid="ignore"):
        return (weight * loss).sum(1) / weight.sum(1), (strict * correct).sum(1) / strict.sum(1)


def rank_correlation(a, b):
    """Spearman's rank correlation of two 1-D arrays (ties get their mean rank); NaN below 3 points."""
    if len(a) < 3:
        return float("nan")

    def ranks(v):
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, r) / counts)[inverse]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pair_losses(model, x, pairs, target, idx, random_answer, dropout=0.0):
    """Each member's loss on its own labels idx (K, W), as a (K, W) tensor. x: (S, T, D) segments; pairs:
    (2, N) the segment indices of every label; target: (N,)."""
    k, w = idx.shape
    returns = segment_returns(model, x[pairs[:, idx].transpose(0, 1).reshape(k, 2 * w)], dropout)  # (K, 2W)
    r_left, r_right = returns.reshape(k, 2, w).unbind(1)
    return preference_loss(r_left, r_right, target[idx], random_answer)


def padded(index_lists):
    """Label indices of each member padded to a common length W: (idx (K, W), weight (K, W), 0 on padding)."""
    width = max(len(v) for v in index_lists)
    idx = np.stack([np.resize(v, width) if len(v) else np.zeros(width, np.int64) for v in index_lists])
    weight = np.stack([np.arange(width) < len(v) for v in index_lists])
    return torch.as_tensor(idx, dtype=torch.int64), torch.as_tensor(weight, dtype=torch.float32)


def weighted_mean(values, weight):
    """values, weight: (K, W) -> (K,) numpy; NaN where a row has no weight."""
    total = weight.sum(1)
    return torch.where(total > 0, (values * weight).sum(1) / total.clamp_min(1), torch.nan).numpy()


def adapt_l2(l2, ratio, args):
    """The paper's rule: multiply a member's L2 coefficient by --l2-factor while its validation loss exceeds
    target_ratio[1] x its training loss (overfitting), divide it while below target_ratio[0] (underfitting).
    l2, ratio: (K,); a NaN ratio (no validation labels) leaves l2 as it is. Returns the new l2 (K,)."""
    low, high = args.target_ratio
    l2 = np.where(ratio > high, l2 * args.l2_factor, np.where(ratio < low, l2 / args.l2_factor, l2))
    return np.clip(l2, *args.l2_range)


def renormalize_inputs(model, mean, std):
    """Give the model input normalisation (mean, std), each (D,), rescaling its first layer so that it computes
    exactly the function it did: (x - m) / s @ W + b = (x - m') / s' @ W' + b' for W' = diag(s' / s) W and
    b' = b + ((m' - m) / s) @ W."""
    import torch
    with torch.no_grad():
        w, b = model.weights[0], model.biases[0]  # (K, D, H), (K, 1, H)
        b += (((mean - model.in_mean) / model.in_std) @ w)[:, None, :]
        w *= (std / model.in_std)[None, :, None]
        model.in_mean.copy_(mean)
        model.in_std.copy_(std)


def fit(x, left, right, target, is_val, counts, args, model=None, l2=None, seed=0):
    """Fit the ensemble to labelled pairs.

    x: (S, T, D) float32 segment inputs; left, right: (N,) int64 indices into S; target: (N,) float32
    P(left preferred); is_val, counts: (K, N) from split_labels. model/l2: a model to warm-start and its
    (K,) L2 coefficients, or None for a new one with input normalisation from x. Returns (model, l2 (K,),
    report) where report has the steps taken and the (K,) val/train loss ratio after each adaptation."""
    members = is_val.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    # A model from scratch has no fitted weights or settled L2 to start from, so it may be given more steps.
    min_steps = args.fresh_min_steps if model is None and args.fresh_min_steps is not None else args.min_steps
    if model is None:
        model = C.build_reward_ensemble(x.shape[-1], members, args.hidden, args.layers, args.inputs,
                                        args.reward_state)
        model.in_mean.copy_(flat.mean(0))
        model.in_std.copy_(flat.std(0).clamp_min(1e-3))
        l2 = None
    elif args.renormalize_inputs:
        renormalize_inputs(model, flat.mean(0), flat.std(0).clamp_min(1e-3))
    # Within --l2-range from the start: a warm-started model's coefficients may come from another range.
    l2 = np.clip(np.full(members, args.l2) if l2 is None else np.asarray(l2, np.float64), *args.l2_range)
    optimizer = C.FlatAdam(model, lr=args.lr, eps=1e-8)  # torch.optim.Adam's default eps
    rng = np.random.default_rng([seed, len(target)])

    # Each member draws its minibatches from its own bootstrap sample (label indices repeated by count).
    # With a handful of labels a sample can come out empty: then the member trains on all it does not
    # validate on, and if that is nothing too, on everything rather than on nothing.
    pools = [np.repeat(np.arange(len(target)), counts[k]) for k in range(members)]
    pools = [p if len(p) else np.flatnonzero(~is_val[k]) if (~is_val[k]).any() else np.arange(len(target))
             for k, p in enumerate(pools)]
    mean_pool = float(np.mean([len(p) for p in pools]))
    steps = args.steps or max(min_steps, math.ceil(args.epochs * mean_pool / args.batch_size))

    # The rule compares each member's validation loss (all its held-out labels) with its training loss on a
    # sample of its bootstrap set as large, both under the current weights: a running mean of minibatch
    # losses lags behind and reads ~10% low while the loss falls, which would ease L2 off too early.
    val_idx, val_weight = padded([np.flatnonzero(is_val[k]) for k in range(members)])
    train_idx, train_weight = padded([rng.permutation(p)[:val_idx.shape[1]] for p in pools])
    has_val = val_weight.sum(1).numpy() > 0
    pairs = torch.stack([left, right])  # (2, N)
    ratios = []
    for step in range(1, steps + 1):
        batch = torch.as_tensor(np.stack([rng.choice(p, args.batch_size) for p in pools]))  # (K, B)
        loss = pair_losses(model, x, pairs, target, batch, args.random_answer, args.dropout).mean(1)  # (K,)
        l2_term = sum((w ** 2).sum(dim=(1, 2)) for w in model.weights)  # (K,)
        total = (loss + torch.as_tensor(l2, dtype=torch.float32) * l2_term).sum()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % args.adapt_every == 0 and has_val.any():
            with torch.no_grad():
                val = weighted_mean(pair_losses(model, x, pairs, target, val_idx, args.random_answer), val_weight)
                train = weighted_mean(pair_losses(model, x, pairs, target, train_idx, args.random_answer),
                                      train_weight)
            ratio = np.where(has_val, val / np.maximum(train, 1e-6), np.nan)
            l2 = adapt_l2(l2, ratio, args)
            ratios.append(ratio)
    return model, l2, {"steps": steps, "epochs": steps * args.batch_size / mean_pool, "ratios": ratios}


def evaluate(model, x, left, right, target, is_val, counts, true_return, random_answer):
    """Figures of a fitted ensemble: per member (K,) training loss and accuracy (bootstrap-weighted),
    validation loss and accuracy, and the Spearman correlation of predicted and true segment returns
    (true_return (S,)) over the segments of its validation pairs that it never trained on."""
    seg_return = all_segment_returns(model, x)  # (K, S)
    train = member_metrics(seg_return, left, right, target, counts.astype(np.float64), random_answer)
    val = member_metrics(seg_return, left, right, target, is_val.astype(np.float64), random_answer)
    correlations = []
    pairs = np.stack([left.numpy(), right.numpy()])
    for k in range(model.members):
        held = np.setdiff1d(pairs[:, is_val[k]], pairs[:, counts[k] > 0])
        correlations.append(rank_correlation(seg_return[k, held].numpy(), true_return[held]))
    return {"train_loss": train[0], "train_accuracy": train[1], "val_loss": val[0], "val_accuracy": val[1],
            "val_return_spearman": np.array(correlations)}


def normalize_output(model, x):
    """Set each member's out_mean/out_std to the mean and std of its per-step output over x (S, T, D)."""
    with torch.no_grad():
        out = torch.cat([model(x[i:i + 256].reshape(-1, x.shape[-1])) for i in range(0, len(x), 256)], 1)
        model.out_mean.copy_(out.mean(1))
        model.out_std.copy_(out.std(1).clamp_min(1e-6))


def labels_digest(labels):
    """A fingerprint of the answers a model is fitted to: which query, which choice, in file order."""
    answers = [[l["query_id"], l["choice"]] for l in labels]
    return hashlib.sha256(json.dumps(answers).encode()).hexdigest()


def save_model(path, model, l2, labels):
    """Write reward_model.pt (README.md, "The data contract"); contract.load_reward_model reads it.
    labels: the usable label records the model was fitted to."""
    C.save_torch_atomic(path, {"model": model.state_dict(), "members": model.members, "hidden": model.hidden,
                               "layers": model.layers, "in_dim": model.in_dim, "inputs": model.inputs,
                               "reward_state": model.reward_state,
                               "l2": [float(v) for v in l2], "labels": len(labels),
                               "labels_digest": labels_digest(labels), "format_version": C.FORMAT_VERSION})


def in_range_share(ratios, target_ratio):
    """Share of the L2 adaptations (all members) that found val/train loss in range; None if there were none."""
    ratios = np.ravel(ratios)
    ratios = ratios[~np.isnan(ratios)]
    if not len(ratios):
        return None
    return round(float(np.mean((ratios >= target_ratio[0]) & (ratios <= target_ratio[1]))), 3)


def mean_or_none(values):
    values = np.asarray(values, np.float64)
    return None if np.all(np.isnan(values)) else float(np.nanmean(values))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = C.open_run(args.run, create=False)
    seed = config["seed"] if args.seed is None else args.seed
    torch.manual_seed(seed)
    started = time.time()

    queries = C.read_queries(args.run)
    labels = [l for l in C.read_labels(args.run, queries) if C.preference_target(l["choice"]) is not None]
    if not labels:
        raise C.UserError(f"{args.run} has no usable labels yet (left/right/equal); run label.py first")
    path = os.path.join(args.run, C.REWARD_MODEL)
    ckpt = C.load_torch(path, "reward model") if os.path.exists(path) and not args.fresh else None
    saved = None if ckpt is None else C.reward_model_from_checkpoint(ckpt, path)
    if saved is not None:  # (a model of other flags is fitted afresh; one of another env's run is refused)
        C.check_reward_model_env(saved, config, path)
    same_architecture = saved is not None and \
        (saved.members, saved.hidden, saved.layers, saved.inputs, saved.reward_state) == \
        (args.members, args.hidden, args.layers, args.inputs, args.reward_state)
    # Decided before the segments are read: once the budget is spent, loop.sh calls this every round.
    if args.if_new_labels and same_architecture and ckpt.get("labels_digest") == labels_digest(labels):
        print(f"train_reward: no new labels since {C.REWARD_MODEL} was fitted ({len(labels)}); it stays as it is")
        return
    segments, index = C.load_queried_segments(args.run, [queries[l["query_id"]] for l in labels])

    x = torch.as_tensor(C.segment_reward_input(segments["obs"], segments["acts"], args.inputs,
                                               args.reward_state, segments.get("next_obs")))  # (S, T or T-1, D)
    left, right, target = label_tensors(labels, queries, index)
    is_val, counts = split_labels([l["query_id"] for l in labels], args.members, args.val_fraction, seed)

    # Warm start from the previous round unless the architecture changed.
    model, l2 = None, None
    if saved is not None:
        if same_architecture and saved.in_dim == x.shape[-1]:
            model, l2 = saved, ckpt["l2"]
        else:
            print(f"train_reward: {path} has another architecture or inputs, so training starts afresh")
    model, l2, report = fit(x, left, right, target, is_val, counts, args, model, l2, seed)
    figures = evaluate(model, x, left, right, target, is_val, counts, segments["rewards"].sum(-1),
                       args.random_answer)
    recent = segments["round"] >= segments["round"].max() - args.normalize_rounds + 1
    normalize_output(model, x[torch.as_tensor(recent)])

    save_model(path, model, l2, labels)
    ratio = figures["val_loss"] / figures["train_loss"]  # (K,): what the L2 rule steers into range
    log = dict(labels=len(labels), steps=report["steps"], epochs=round(report["epochs"], 1),
               **{k: mean_or_none(v) for k, v in figures.items()}, l2=[float(v) for v in l2],
               val_train_ratio=[None if np.isnan(r) else round(float(r), 3) for r in ratio],
               ratio_in_range=in_range_share(report["ratios"], args.target_ratio),
               seconds=round(time.time() - started, 2))
    C.log_metrics(args.run, "train_reward", **log)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"train_reward: {len(labels)} labels, {report['steps']} steps ({log['epochs']} epochs), train acc "
          f"{fmt(log['train_accuracy'])} loss {fmt(log['train_loss'])}, val acc {fmt(log['val_accuracy'])} loss "
          f"{fmt(log['val_loss'])}, val/train loss {fmt(mean_or_none(ratio))}, held-out return spearman "
          f"{fmt(log['val_return_spearman'])}, {log['seconds']:.1f}s")


if __name__ == "__main__":
    C.run_main(main)
