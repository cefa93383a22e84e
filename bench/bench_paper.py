"""The paper's headline experiment (Christiano et al. 2017, Figure 2): PPO on the true reward against the full
loop with the oracle teacher at several label budgets, same step budget and seeds, on HalfCheetah-v5 and
Hopper-v5 as the paper posed them (fixed horizon, no torque penalty, Hopper paid for its height instead of
ending when it falls: contract.TASK_KWARGS).

    python bench/bench_paper.py                      # default budget: 1 seed, 500k steps, 2 jobs at a time
    python bench/bench_paper.py --steps 1000000      # the full budget of 1M steps (about twice as long)
    python bench/bench_paper.py --seeds 0 1 2 --jobs 16   # e.g. on a 16-core machine
    MUJOCO_GL=disable python bench/bench_paper.py ...     # on a machine without EGL (no clips are rendered)
    python bench/bench_paper.py --report-only             # table and plot of what has finished so far
    python bench/bench_paper.py --envs HalfCheetah-v5 --labels 700 --teachers oracle mistake stochastic myopic skip equal

Every condition trains the same PPO with the same entropy bonus (--ent-coef, loop.sh's 0.01, decaying to 0
with the learning rate unless --no-ent-anneal), so that they differ in the reward only.

Resumable: each condition lives in its own run directory under --out (by default one per step budget,
bench/out/paper-500k), records what it is trained with in settings.json when it starts and is marked done by
done.json; a re-run does only what is missing (and resumes a condition that was interrupted), and refuses a
condition, finished or not, that was begun with other flags. While conditions train it prints, every minute, where each one is. Writes
the table to <out>/paper.md and the plot to <out>/paper.png, and prints both paths.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contract as C  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    p.add_argument("--labels", nargs="+", type=int, default=[350, 700, 1400], help="label budgets")
    p.add_argument("--steps", type=int, default=500_000,
                   help="policy env steps of every condition (the default fits in 90 min on 2 cores)")
    p.add_argument("--steps-per-round", type=int, default=50_000, help="policy steps between label rounds")
    p.add_argument("--label-steps", type=int, default=None,
                   help="policy steps by which a label condition has asked its whole budget; the reward model "
                        "stays as it is after that (loop.sh's LABEL_STEPS; default: the last round's step)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--teachers", nargs="+", default=["oracle"], choices=sorted(TEACHERS),
                   help="synthetic teachers of the label conditions (B-Pref's settings)")
    p.add_argument("--ent-coef", type=float, default=0.01,
                   help="the policy's entropy bonus in every condition, the true-reward one included, so that the "
                        "conditions differ in the reward only (loop.sh's ENT_COEF; 0: PPO's usual none)")
    p.add_argument("--ent-anneal", action=argparse.BooleanOptionalAction, default=True,
                   help="the bonus decays to 0 with the learning rate, in every condition (loop.sh's ENT_ANNEAL)")
    p.add_argument("--init-log-std", type=float, default=0.0,
                   help="log std of the new policy's actions in every condition (train_policy.py's flag; 0: "
                        "CleanRL's std of 1)")
    p.add_argument("--jobs", type=int, default=2, help="conditions run at once (one core each)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--progress-every", type=float, default=60,
                   help="seconds between progress lines (each running condition's policy step)")
    p.add_argument("--out", default=None, help="results directory (default: bench/out/paper-<steps/1000>k)")
    p.add_argument("--report-only", action="store_true",
                   help="write the table and plot of the conditions finished so far, run nothing")
    args = p.parse_args()
    if args.progress_every <= 0:
        p.error("argument --progress-every: must be above 0 seconds")
    for flag, ok in {"--labels": min(args.labels) >= 1, "--steps": args.steps >= 1, "--seeds": min(args.seeds) >= 0,
                     "--steps-per-round": args.steps_per_round >= 1, "--jobs": args.jobs >= 1,
                     "--eval-episodes": args.eval_episodes >= 1, "--ent-coef": args.ent_coef >= 0,
                     "--label-steps": args.label_steps is None or args.label_steps >= 1,
                     "--init-log-std": -10 <= args.init_log_std <= 2}.items():
        if not ok:  # (a condition would fail only after the others had trained, or not start at all)
            p.error(f"argument {flag}: value out of range (see --help)")
    args.out = args.out or os.path.join(ROOT, "bench", "out", f"paper-{args.steps // 1000}k")
    # As loop.sh clamps it: labels are never due after the last round's collect.
    last = last_collect(args.steps, args.steps_per_round)
    args.label_steps = last if args.label_steps is None else min(last, max(1, args.label_steps))
    return args


def last_collect(steps, steps_per_round):
    """The policy step of loop.sh's last collect, by which it asks the whole label budget by default."""
    return max(1, (steps - 1) // steps_per_round * steps_per_round)


# B-Pref's imperfect teachers at the settings of Lee et al. (2021), as label.py teach flags.
TEACHERS = {"oracle": "", "mistake": "--mistake 0.1", "stochastic": "--beta 1", "myopic": "--gamma 0.9",
            "skip": "--skip 0.1", "equal": "--equal 0.1"}


def condition_name(env_id, labels, seed, teacher="oracle", true_ent_coef=0.0):
    if labels is None:  # the bonus in the name: results of before --ent-coef, without one, are not mixed in
        return f"{env_id}-true-s{seed}" if true_ent_coef == 0 else f"{env_id}-true-ent{true_ent_coef:g}-s{seed}"
    return f"{env_id}-{labels}labels{'' if teacher == 'oracle' else '-' + teacher}-s{seed}"


def segment_seconds(env_id):
    """The segment length a new label condition gets: loop.sh's SEGMENT_SECONDS if set, else collect.py's."""
    return float(os.environ.get("SEGMENT_SECONDS") or C.default_segment_seconds(env_id))


def condition_settings(args, env_id, labels, seed, teacher):
    """What a condition is trained and scored with: written to its settings.json when it starts and into its
    done.json when it ends, and checked against the flags by every later run (finished_record)."""
    return {"env": env_id, "labels": labels, "seed": seed, "steps": args.steps, "teacher": teacher,
            "ent_coef": args.ent_coef, "ent_anneal": args.ent_anneal, "init_log_std": args.init_log_std,
            "eval_episodes": args.eval_episodes,
            **({} if labels is None else {"label_steps": args.label_steps, "steps_per_round": args.steps_per_round})}


def finished_record(args, run):
    """The done.json record of a finished condition, or None. Refuses a condition, finished or only begun
    (its settings.json), of another task, budget, bonus, starting std, schedule or evaluation, or (a label
    condition) segment length: its results would be another experiment's under this one's table."""
    for name in ("done.json", "settings.json"):
        path = os.path.join(run, name)
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            check_settings(args, run, record)
            return record if name == "done.json" else None
    return None


def check_settings(args, run, record):
    config = C.read_config(run)  # (None where a condition's results were copied without it: not checked)
    if config and config["env_kwargs"] != C.default_env_kwargs(record["env"]):
        raise C.UserError(f"{run} was trained on {record['env']} with env kwargs "
                          f"{json.dumps(config['env_kwargs'])}, not the paper's task "
                          f"{json.dumps(C.default_env_kwargs(record['env']))}; give another --out")
    if record["labels"] is not None and config and config["segment_seconds"] != segment_seconds(record["env"]):
        raise C.UserError(f"{run} was trained on {config['segment_seconds']:g} s segments, not "
                          f"{segment_seconds(record['env']):g} s; give another --out")
    if record["steps"] != args.steps:
        raise C.UserError(f"{run} was trained for {record['steps']:,} steps, not {args.steps:,}; "
                          f"give another --out")
    if record.get("ent_coef", args.ent_coef) != args.ent_coef:  # (records of before --ent-coef lack it)
        raise C.UserError(f"{run} was trained with entropy bonus {record['ent_coef']:g}, not "
                          f"{args.ent_coef:g}; give another --out")
    # (records of before --label-steps lack it: their labels were due until the last round's collect)
    label_steps = record.get("label_steps", last_collect(record["steps"], args.steps_per_round))
    if record["labels"] is not None and label_steps != args.label_steps:
        raise C.UserError(f"{run} asked its labels until step {label_steps:,}, not "
                          f"{args.label_steps:,}; give another --out")
    if record.get("ent_anneal", False) != args.ent_anneal:  # (records of before --ent-anneal lack it)
        raise C.UserError(f"{run} was trained with the entropy bonus "
                          f"{'decaying' if record.get('ent_anneal') else 'constant'}, not "
                          f"{'decaying' if args.ent_anneal else 'constant'}; give another --out")
    if record.get("init_log_std", 0.0) != args.init_log_std:  # (records of before --init-log-std lack it)
        raise C.UserError(f"{run} started its policy at log std {record.get('init_log_std', 0.0):g}, "
                          f"not {args.init_log_std:g}; give another --out")
    # (records of before 2026-12-06 lack these two)
    if record.get("eval_episodes", args.eval_episodes) != args.eval_episodes:
        raise C.UserError(f"{run} was scored over {record['eval_episodes']} evaluation episodes, not "
                          f"{args.eval_episodes}; give another --out")
    if record["labels"] is not None and record.get("steps_per_round", args.steps_per_round) != args.steps_per_round:
        raise C.UserError(f"{run} had label rounds every {record['steps_per_round']:,} steps, not "
                          f"{args.steps_per_round:,}; give another --out")


# The conditions training now, name -> run directory, for the progress lines (a condition takes minutes to an
# hour, and its own output goes to its .log).
RUNNING = {}
RUNNING_LOCK = threading.Lock()


def training_episodes(run):
    """The run's train_policy records (one per finished training episode) from its metrics.jsonl, oldest first."""
    return [m for m in C.read_jsonl(os.path.join(run, C.METRICS), warn=False) if m["stage"] == "train_policy"]


def latest_policy_step(run):
    """The policy step of the run's last training episode (0 before the first)."""
    episodes = training_episodes(run)
    return episodes[-1]["step"] if episodes else 0


def print_progress(args, names, stop):
    """Until stop is set, every --progress-every seconds: elapsed time, conditions finished, and where each
    running one is."""
    started = time.time()
    while not stop.wait(args.progress_every):
        with RUNNING_LOCK:
            running = dict(RUNNING)
        finished = sum(os.path.exists(os.path.join(args.out, name, "done.json")) for name in names)
        where = "; ".join(f"{name} at step {latest_policy_step(run):,}/{args.steps:,}"
                          for name, run in sorted(running.items()))
        print(f"[{(time.time() - started) / 60:.0f} min] {finished} of {len(names)} finished"
              f"{'; ' + where if where else ''}", flush=True)


def run_condition(args, env_id, labels, seed, teacher="oracle"):
    """Train one condition to the end (resuming if interrupted) and return its done.json record."""
    name = condition_name(env_id, labels, seed, teacher, args.ent_coef)
    run = os.path.join(args.out, name)
    record = finished_record(args, run)
    if record is not None:
        return record
    with RUNNING_LOCK:
        RUNNING[name] = run
    try:
        return train_condition(args, env_id, labels, seed, teacher, name, run)
    finally:
        with RUNNING_LOCK:
            RUNNING.pop(name)


def train_condition(args, env_id, labels, seed, teacher, name, run):
    """run_condition's training, evaluation and done.json of a condition that has not finished."""
    os.makedirs(run, exist_ok=True)
    settings = condition_settings(args, env_id, labels, seed, teacher)
    if not os.path.exists(os.path.join(run, "settings.json")):  # (finished_record checked one that is there)
        C.write_json_atomic(os.path.join(run, "settings.json"), settings)
    started = time.time()
    log = open(os.path.join(args.out, name + ".log"), "a")
    # MUJOCO_GL from the caller when set: on a machine without EGL, "disable" runs the (clip-less) conditions
    env = {"MUJOCO_GL": "egl", **os.environ, "OMP_NUM_THREADS": "1", "ENT_COEF": str(args.ent_coef),
           "ENT_ANNEAL": str(int(args.ent_anneal))}
    python = sys.executable
    if labels is None:
        commands = [[python, "train_policy.py", "--run", run, "--env", env_id, "--seed", str(seed), "--reward",
                     "true", "--total-steps", str(args.steps), "--ent-coef", str(args.ent_coef),
                     *(["--ent-anneal"] if args.ent_anneal else []), "--init-log-std", f"{args.init_log_std:g}"],
                    [python, "collect.py", "--run", run, "--evaluate", str(args.eval_episodes), "--no-clips"]]
    else:
        env.update(RUN=run, ENV_ID=env_id, SEED=str(seed), LABELS=str(labels), TOTAL_STEPS=str(args.steps),
                   STEPS_PER_ROUND=str(args.steps_per_round), LABEL_STEPS=str(args.label_steps), CLIPS="0",
                   EVAL_EPISODES=str(args.eval_episodes), PYTHON=python,
                   TEACHER="oracle" if teacher == "oracle" else "synthetic", TEACHER_FLAGS=TEACHERS[teacher],
                   POLICY_FLAGS=f"--init-log-std {args.init_log_std:g} " + os.environ.get("POLICY_FLAGS", ""))
        commands = [["bash", "loop.sh"]]
    for command in commands:
        log.write("+ " + " ".join(command) + "\n")  # as loop.sh logs its commands
        log.flush()
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise C.UserError(f"{name} failed; see {os.path.join(args.out, name + '.log')}")
    metrics = C.read_jsonl(os.path.join(run, C.METRICS), warn=False)
    evaluation = [m for m in metrics if m["stage"] == "evaluate" and m["policy"] != "random"][-1]
    episodes = [m for m in metrics if m["stage"] == "train_policy"]
    record = {**settings, "segment_steps": C.read_config(run)["segment_steps"],
              "eval_true_return": evaluation["true_return_mean"],
              "train_true_return_last20": float(np.mean([e["true_return"] for e in episodes[-20:]])),
              "minutes": round((time.time() - started) / 60, 1)}
    C.write_json_atomic(os.path.join(run, "done.json"), record)
    print(f"done: {name}: true return {record['eval_true_return']:.1f} "
          f"({record['minutes']} min)", flush=True)
    return record


def curve(run, bins=40, steps=None):
    """Mean true episode return in equal step bins: (bin centres, means)."""
    episodes = training_episodes(run)
    if not episodes:
        return np.array([]), np.array([])
    x = np.array([e["step"] for e in episodes], float)
    y = np.array([e["true_return"] for e in episodes], float)
    edges = np.linspace(0, steps or x.max(), bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    means = np.array([y[which == b].mean() if np.any(which == b) else np.nan for b in range(bins)])
    return (edges[:-1] + edges[1:]) / 2, means


def report(args, records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = [f"Budget: {args.steps:,} policy steps per condition, seeds {args.seeds}, label rounds every "
             f"{args.steps_per_round:,} steps, all labels asked by step {args.label_steps:,}, entropy bonus "
             f"{args.ent_coef:g}"
             f"{' decaying to 0 with the learning rate' if args.ent_anneal else ''} and new policies' log std "
             f"{args.init_log_std:g} in every condition, true return = "
             f"mean of {args.eval_episodes} evaluation episodes of the final policy (mean over seeds), label "
             f"segments of " + ", ".join(f"{segment_seconds(e):g} s ({e})" for e in args.envs) + ".", "",
             "| env | condition | final true return | per seed | ratio to true-reward RL |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(args.envs), figsize=(6 * len(args.envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], args.envs):
        base = [r["eval_true_return"] for r in records if r["env"] == env_id and r["labels"] is None]
        base_mean = float(np.mean(base)) if base else float("nan")
        for labels, teacher in [(None, "oracle")] + [(n, t) for t in args.teachers for n in args.labels]:
            rows = [r for r in records if r["env"] == env_id and r["labels"] == labels
                    and r.get("teacher", "oracle") == teacher]
            if not rows:
                continue
            rows.sort(key=lambda r: r["seed"])
            value = float(np.mean([r["eval_true_return"] for r in rows]))
            per_seed = ", ".join(f"{r['eval_true_return']:.0f} (s{r['seed']})" for r in rows)
            name = "RL on the true reward" if labels is None else f"{labels} synthetic labels" + (
                "" if teacher == "oracle" else f", {teacher} teacher ({TEACHERS[teacher]})")
            lines.append(f"| {env_id} | {name} | {value:.0f} | {per_seed} | {value / base_mean:.2f} |")
            curves = [curve(os.path.join(args.out, condition_name(env_id, labels, s, teacher, args.ent_coef)),
                            steps=args.steps) for s in args.seeds]
            curves = [c for c in curves if len(c[0])]
            if curves:
                ax.plot(curves[0][0], np.nanmean([c[1] for c in curves], axis=0), label=name,
                        color="black" if labels is None else None, linestyle="--" if labels is None else "-")
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("true episode return")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, "paper.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    C.write_atomic(png, buf.getvalue())
    table = "\n".join(lines) + "\n"
    C.write_atomic(os.path.join(args.out, "paper.md"), table.encode())
    print(table)
    print(f"table: {os.path.join(args.out, 'paper.md')}\nplot:  {png}")


def main():
    args = parse_args()
    # Seed by seed (a seed's table is complete before the next one starts); within a seed the longest
    # conditions (most labels) first and the true-reward ones last, so that the jobs end together.
    conditions = [c for seed in args.seeds for c in
                  [(env_id, labels, seed, teacher) for labels in sorted(args.labels)[::-1] for env_id in args.envs
                   for teacher in args.teachers] + [(env_id, None, seed, "oracle") for env_id in args.envs]]
    print(f"bench_paper: {len(conditions)} conditions of {args.steps:,} steps, {args.jobs} at a time, "
          f"results in {args.out}", flush=True)
    # Every finished condition checked before any starts: a refusal must not wait for (or leave behind) a run.
    finished = [finished_record(args, os.path.join(args.out, condition_name(*c, args.ent_coef)))
                for c in conditions]
    if args.report_only:
        records = [r for r in finished if r is not None]
        print(f"{len(records)} of {len(conditions)} conditions finished")
        if not records:
            raise C.UserError(f"no condition of these flags has finished in {args.out}; nothing to report")
    else:
        stop = threading.Event()
        names = [condition_name(*c, args.ent_coef) for c in conditions]
        threading.Thread(target=print_progress, args=(args, names, stop), daemon=True).start()
        try:
            with ThreadPoolExecutor(args.jobs) as pool:
                records = list(pool.map(lambda c: run_condition(args, *c), conditions))
        finally:
            stop.set()
    report(args, records)


if __name__ == "__main__":
    C.run_main(main)
