"""Stage 3 of the loop: fit the reward model r(obs, action) to the teacher's preferences.

The model is an ensemble of small MLPs (the paper's: 2 hidden layers of 64, leaky ReLU). Each member is
fitted on its own bootstrap resample of the labels and holds out its own 1/e of them for validation. The
probability that the teacher prefers the left segment is modelled as (Bradley-Terry)

    P(left > right) = (1 - eps) * softmax(sum_t r(left_t), sum_t r(right_t))[0] + eps / 2

where eps (default 0.1) is the chance that the teacher answered at random. `equal` trains towards 0.5/0.5,
`skip` is not trained on. L2 regularisation is adapted per member so that validation loss stays within
1.1-1.5x training loss (the paper's rule). Training warm-starts from the previous round's model.

    python train_reward.py --run data/cheetah

Reads: config.json, segments/, queries.jsonl, labels.jsonl, reward_model.pt.
Writes: reward_model.pt, metrics.jsonl.
"""
import argparse
import os
import time

import numpy as np
import torch

import contract as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--members", type=int, default=3, help="ensemble size")
    p.add_argument("--hidden", type=int, default=64, help="hidden layer width")
    p.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    p.add_argument("--steps", type=int, default=400, help="gradient steps this call")
    p.add_argument("--batch-size", type=int, default=64, help="labelled pairs per member per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--random-answer", type=float, default=0.1,
                   help="assumed probability that the teacher answered uniformly at random")
    p.add_argument("--val-fraction", type=float, default=float(1 / np.e), help="share held out per member")
    p.add_argument("--l2", type=float, default=1e-4, help="initial L2 coefficient (then adapted)")
    p.add_argument("--adapt-every", type=int, default=25, help="steps between L2 adaptations")
    p.add_argument("--normalize-rounds", type=int, default=3,
                   help="normalise each member's output over the states of this many latest rounds")
    p.add_argument("--fresh", action="store_true", help="start from a new model instead of the saved one")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def preference_loss(r_left, r_right, target, random_answer):
    """Cross-entropy of the teacher's answer under the Bradley-Terry model with a random-answer floor.

    r_left, r_right: predicted segment returns (...,); target: P(left preferred) in {0, 0.5, 1} (...,).
    Returns the per-pair loss (...,)."""
    p_left = (1 - random_answer) * torch.sigmoid(r_left - r_right) + random_answer / 2
    return -(target * torch.log(p_left) + (1 - target) * torch.log(1 - p_left))


def split_labels(query_ids, members, val_fraction, seed):
    """Per member, which labels it validates on and how often each other label is in its bootstrap sample.

    query_ids: (N,). Returns (is_val (K, N) bool, counts (K, N) int). Both depend only on (seed, query id,
    member), so a label keeps its role from round to round: a warm-started member never trains on what it
    validated on before."""
    is_val = np.zeros((members, len(query_ids)), bool)
    counts = np.zeros((members, len(query_ids)), np.int64)
    for j, qid in enumerate(query_ids):
        for k in range(members):
            rng = np.random.default_rng([seed, int(qid), k])
            is_val[k, j] = rng.random() < val_fraction
            counts[k, j] = 0 if is_val[k, j] else rng.poisson(1.0)
    return is_val, counts


def segment_returns(model, x):
    """x: (K, B, T, D) inputs -> (K, B) each member's predicted return of its own segments."""
    k, b, t, d = x.shape
    return model(x.reshape(k, b * t, d)).reshape(k, b, t).sum(-1)


def evaluate(model, x, left, right, target, mask, random_answer):
    """Loss and accuracy per member over the pairs where mask (K, N) is set. left/right: (N,) segment
    indices into x (S, T, D); target: (N,). Accuracy counts only pairs with a strict preference."""
    with torch.no_grad():
        seg_return = segment_returns(model, x.unsqueeze(0).expand(model.members, -1, -1, -1))  # (K, S)
        r_left, r_right = seg_return[:, left], seg_return[:, right]
        loss = preference_loss(r_left, r_right, target, random_answer)
        correct = ((r_left > r_right) == (target > 0.5)).float()
        strict = (target != 0.5)
    losses, accs = [], []
    for k in range(model.members):
        m = torch.as_tensor(mask[k])
        losses.append(float(loss[k][m].mean()) if m.any() else float("nan"))
        ms = m & strict
        accs.append(float(correct[k][ms].mean()) if ms.any() else float("nan"))
    return np.array(losses), np.array(accs), seg_return.numpy()


def rank_correlation(a, b):
    """Spearman's rank correlation of two 1-D arrays (ties broken by order; enough for a progress log)."""
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = C.open_run(args.run, create=False)
    seed = config["seed"] if args.seed is None else args.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.time()

    queries = C.read_queries(args.run)
    labels = [l for l in C.read_labels(args.run, queries) if C.preference_target(l["choice"]) is not None]
    if not labels:
        raise C.UserError(f"{args.run} has no usable labels yet (left/right/equal); run label.py first")
    segments = C.load_segments(args.run)
    if segments is None:
        raise C.UserError(f"{args.run} has labels but no segment files; run collect.py first")
    index = {int(s): i for i, s in enumerate(segments["ids"])}
    missing = {q for l in labels for q in (queries[l["query_id"]]["left"], queries[l["query_id"]]["right"])
               if q not in index}
    if missing:
        raise C.UserError(f"{len(missing)} segments named by labelled queries are missing from "
                          f"{C.SEGMENTS_DIR}/ (e.g. {sorted(missing)[0]})")

    x = torch.as_tensor(C.reward_input(segments["obs"], segments["acts"]))  # (S, T, D)
    left = torch.as_tensor([index[queries[l["query_id"]]["left"]] for l in labels])
    right = torch.as_tensor([index[queries[l["query_id"]]["right"]] for l in labels])
    target = torch.as_tensor([C.preference_target(l["choice"]) for l in labels], dtype=torch.float32)
    is_val, counts = split_labels([l["query_id"] for l in labels], args.members, args.val_fraction, seed)

    # Warm start from the previous round unless the architecture changed.
    model, l2 = None, np.full(args.members, args.l2)
    path = os.path.join(args.run, C.REWARD_MODEL)
    if os.path.exists(path) and not args.fresh:
        ckpt = C.load_torch(path, "reward model")
        if (ckpt["members"], ckpt["hidden"], ckpt["layers"], ckpt["in_dim"]) == \
                (args.members, args.hidden, args.layers, x.shape[-1]):
            model = C.build_reward_ensemble(x.shape[-1], args.members, args.hidden, args.layers)
            model.load_state_dict(ckpt["model"])
            l2 = np.asarray(ckpt["l2"], np.float64)
    if model is None:
        model = C.build_reward_ensemble(x.shape[-1], args.members, args.hidden, args.layers)
        flat = x.reshape(-1, x.shape[-1])
        model.in_mean.copy_(flat.mean(0))
        model.in_std.copy_(flat.std(0).clamp_min(1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    # Each member draws its minibatches from its own bootstrap sample (label indices repeated by count).
    pools = [np.repeat(np.arange(len(labels)), counts[k]) for k in range(args.members)]
    if any(len(p) == 0 for p in pools):
        pools = [np.flatnonzero(~is_val[k]) if len(p) == 0 else p for k, p in enumerate(pools)]
    if any(len(p) == 0 for p in pools):  # a handful of labels: train on everything rather than on nothing
        pools = [np.arange(len(labels)) for _ in range(args.members)]
    train_mask = counts > 0
    for step in range(1, args.steps + 1):
        batch = torch.as_tensor(np.stack([rng.choice(p, args.batch_size) for p in pools]))  # (K, B)
        r_left = segment_returns(model, x[left[batch]])
        r_right = segment_returns(model, x[right[batch]])
        loss = preference_loss(r_left, r_right, target[batch], args.random_answer).mean(1)  # (K,)
        l2_term = sum((w ** 2).sum(dim=(1, 2)) for w in model.weights)  # (K,)
        total = (loss + torch.as_tensor(l2, dtype=torch.float32) * l2_term).sum()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % args.adapt_every == 0 and is_val.any():
            train_loss, _, _ = evaluate(model, x, left, right, target, train_mask, args.random_answer)
            val_loss, _, _ = evaluate(model, x, left, right, target, is_val, args.random_answer)
            ratio = val_loss / np.maximum(train_loss, 1e-6)
            l2 = np.where(ratio > 1.5, l2 * 1.5, np.where(ratio < 1.1, l2 / 1.5, l2))
            l2 = np.clip(np.nan_to_num(l2, nan=args.l2), 1e-8, 10.0)

    train_loss, train_acc, _ = evaluate(model, x, left, right, target, train_mask, args.random_answer)
    val_loss, val_acc, seg_return = evaluate(model, x, left, right, target, is_val, args.random_answer)

    # Correlation of predicted and true segment returns on each member's held-out segments.
    true_return = segments["rewards"].sum(-1)
    correlations = []
    for k in range(args.members):
        held = np.unique(np.concatenate([left[is_val[k]].numpy(), right[is_val[k]].numpy()]))
        trained = np.unique(np.concatenate([left[train_mask[k]].numpy(), right[train_mask[k]].numpy()]))
        held = np.setdiff1d(held, trained)
        correlations.append(rank_correlation(seg_return[k, held], true_return[held]))

    # Normalise each member's output over recently collected states (the paper's zero mean, unit std).
    recent = segments["round"] >= segments["round"].max() - args.normalize_rounds + 1
    with torch.no_grad():
        out = model(x[torch.as_tensor(recent)].reshape(-1, x.shape[-1]))  # (K, n*T)
        model.out_mean.copy_(out.mean(1))
        model.out_std.copy_(out.std(1).clamp_min(1e-6))

    C.save_torch_atomic(path, {"model": model.state_dict(), "members": args.members, "hidden": args.hidden,
                               "layers": args.layers, "in_dim": x.shape[-1], "l2": l2.tolist(),
                               "labels": len(labels), "format_version": C.FORMAT_VERSION})
    figures = dict(labels=len(labels), steps=args.steps, train_loss=float(np.nanmean(train_loss)),
                   val_loss=float(np.nanmean(val_loss)), train_accuracy=float(np.nanmean(train_acc)),
                   val_accuracy=float(np.nanmean(val_acc)), l2=[float(v) for v in l2],
                   val_return_spearman=float(np.nanmean(correlations)) if not np.all(np.isnan(correlations))
                   else None, seconds=round(time.time() - started, 2))
    C.log_metrics(args.run, "train_reward", **figures)
    print(f"train_reward: {len(labels)} labels, train acc {figures['train_accuracy']:.3f}, val acc "
          f"{figures['val_accuracy']:.3f}, val loss {figures['val_loss']:.3f}, held-out return spearman "
          f"{figures['val_return_spearman'] if figures['val_return_spearman'] is None else round(figures['val_return_spearman'], 3)}, "
          f"{figures['seconds']:.1f}s")


if __name__ == "__main__":
    C.run_main(main)
