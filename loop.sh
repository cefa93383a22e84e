#!/usr/bin/env bash
# The training loop of deep RL from human preferences: rounds of
#   collect.py -> label.py -> train_reward.py -> train_policy.py
# Every knob is an environment variable with a default, e.g.
#   RUN=data/cheetah ENV_ID=HalfCheetah-v5 LABELS=700 TOTAL_STEPS=1000000 ./loop.sh
#   TEACHER=human ./loop.sh          # people answer in the web labeler (python label.py serve)
# Re-running the same command resumes: each stage only does what is still missing.
set -euo pipefail
# The stages run from the repository; a RUN or PYTHON given relative to where the loop was started stays so.
case "${RUN:-}" in ""|/*) ;; *) RUN="$PWD/$RUN" ;; esac
case "${PYTHON:-}" in ""|/*) ;; */*) PYTHON="$PWD/$PYTHON" ;; esac
# A teacher's behaviour given as module:function (TEACHER_FLAGS) is looked for where the loop was started, too.
export LOOP_START_DIR="$PWD"
cd "$(dirname "$0")"

RUN=${RUN:-data/demo}
ENV_ID=${ENV_ID:-HalfCheetah-v5}
SEED=${SEED:-}                             # seed of a new run (default 0), fixed when the run is created
SEGMENT_SECONDS=${SEGMENT_SECONDS:-}      # segment length in simulated seconds, fixed when the run is created
                                          # (default: collect.py's, the paper's: 0.48 for Hopper, else 1.5)
ENV_KWARGS=${ENV_KWARGS:-}                # JSON keyword arguments for gym.make, fixed when the run is created
                                          # (default: the paper's task; '{}' for gymnasium's own)
TOTAL_STEPS=${TOTAL_STEPS:-500000}        # policy environment steps in all
STEPS_PER_ROUND=${STEPS_PER_ROUND:-50000} # policy steps between two label rounds
LABELS=${LABELS:-500}                     # label budget: pairs asked over the whole run
PRETRAIN_FRACTION=${PRETRAIN_FRACTION:-0.25}  # share asked about the random policy before any RL
LABEL_STEPS=${LABEL_STEPS:-}              # policy steps by which the whole budget is asked (default and most:
                                          # the last round's); after that the reward model stays as it is, so
                                          # the agent's reward stops moving under it (e.g. TOTAL_STEPS / 2)
SELECTION=${SELECTION:-disagreement}      # random | disagreement
TEACHER=${TEACHER:-oracle}                # oracle | synthetic (label.py teach $TEACHER_FLAGS) | human
TEACHER_FLAGS=${TEACHER_FLAGS:-}          # e.g. "--mistake 0.1" or "--behaviour cheetah_backwards"
HUMAN_FRACTION=${HUMAN_FRACTION:-0.75}    # with TEACHER=human: share of pairs answered before going on
CLIPS=${CLIPS:-auto}                      # render clips: auto (only for people) | 1 | 0
REWARD_INPUTS=${REWARD_INPUTS:-}          # what the reward model sees: obs | obs+act (the paper's r(o, a)) |
                                          # obs+next (a step's two states); default: train_reward.py's
REWARD_STEPS=${REWARD_STEPS:-}            # reward model gradient steps per round (default: train_reward.py's,
                                          # which grow with the number of labels)
REWARD_FLAGS=${REWARD_FLAGS:-}            # more train_reward.py flags, e.g. "--members 5"
NUM_ENVS=${NUM_ENVS:-8}
ENT_COEF=${ENT_COEF:-0.01}                # the policy's entropy bonus: the paper's 0.01 keeps it exploring while
                                          # the reward model under it changes (0: PPO's usual none)
ENT_ANNEAL=${ENT_ANNEAL:-1}               # 1: the bonus decays to 0 with the learning rate, so that the agent
                                          # explores while the early models are rough and acts precisely at the end
COLLECT_FLAGS=${COLLECT_FLAGS:-}          # more collect.py flags, e.g. "--mean-action-share 0.5"
POLICY_FLAGS=${POLICY_FLAGS:-}            # more train_policy.py flags, e.g. "--overlap"
EVAL_EPISODES=${EVAL_EPISODES:-5}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export MUJOCO_GL=${MUJOCO_GL:-egl}

refuse() { echo "error: $*" >&2; exit 2; }
case "$TEACHER" in oracle|synthetic|human) ;; *) refuse "TEACHER must be oracle, synthetic or human, not '$TEACHER'" ;; esac
case "$CLIPS" in auto|1|0) ;; *) refuse "CLIPS must be auto, 1 or 0, not '$CLIPS'" ;; esac
[ "$TEACHER" = human ] && [ "$CLIPS" = 0 ] && refuse "TEACHER=human needs clips to show people; drop CLIPS=0"
[ -z "$TEACHER_FLAGS" ] || [ "$TEACHER" = synthetic ] || \
  refuse "TEACHER_FLAGS are for TEACHER=synthetic; TEACHER=$TEACHER would ignore '$TEACHER_FLAGS'"
# Numbers bash computes with (a typo would be a bash error half-way, after a stage had run) or that must ask labels.
whole() {  # NAME VALUE LEAST: a whole number (no sign, no leading zero, at most 15 digits) of at least LEAST
  [[ "$2" =~ ^(0|[1-9][0-9]{0,14})$ ]] && [ "$2" -ge "$3" ] ||
    refuse "$1 must be a whole number of at least $3, not '$2'"
}
[ -z "$SEED" ] || whole SEED "$SEED" 0; whole TOTAL_STEPS "$TOTAL_STEPS" 1; whole STEPS_PER_ROUND "$STEPS_PER_ROUND" 1
whole LABELS "$LABELS" 1; whole NUM_ENVS "$NUM_ENVS" 1; whole EVAL_EPISODES "$EVAL_EPISODES" 1
[ -z "$LABEL_STEPS" ] || whole LABEL_STEPS "$LABEL_STEPS" 1
awk -v x="$PRETRAIN_FRACTION" 'BEGIN { exit !(x ~ /^([0-9]*[.])?[0-9]+$/ && x > 0 && x <= 1) }' || \
  refuse "PRETRAIN_FRACTION must be a number above 0 and at most 1, not '$PRETRAIN_FRACTION'"
awk -v x="$PRETRAIN_FRACTION" -v n="$LABELS" 'BEGIN { exit !(x * n > 0.5) }' || \
  refuse "PRETRAIN_FRACTION=$PRETRAIN_FRACTION of LABELS=$LABELS is no pair to fit the first reward model to"
case "$ENT_ANNEAL" in 0|1) ;; *) refuse "ENT_ANNEAL must be 1 or 0, not '$ENT_ANNEAL'" ;; esac

clip_flag=--no-clips
if [ "$CLIPS" = 1 ] || { [ "$CLIPS" = auto ] && [ "$TEACHER" = human ]; }; then clip_flag=; fi
# All labels are due by LABEL_STEPS, or by the last round's collect, so the budget is spent before training ends.
last_round=$(( (TOTAL_STEPS + STEPS_PER_ROUND - 1) / STEPS_PER_ROUND - 1 ))
last_collect=$(( last_round > 0 ? last_round * STEPS_PER_ROUND : 1 ))
label_steps=${LABEL_STEPS:-$last_collect}
schedule_end=$(( label_steps < 1 ? 1 : label_steps < last_collect ? label_steps : last_collect ))
# With one round there is no later collect: the whole budget is asked before RL, about the random policy.
pretrain_fraction=$( [ "$last_round" = 0 ] && echo 1 || echo "$PRETRAIN_FRACTION" )

run() { echo "+ $*" >&2; "$@"; }

# The random policy's score, once, for comparison at the end.
if ! grep -qs '"policy": "random"' "$RUN/metrics.jsonl"; then
  run "$PYTHON" collect.py --run "$RUN" --env "$ENV_ID" ${SEED:+--seed "$SEED"} ${SEGMENT_SECONDS:+--segment-seconds "$SEGMENT_SECONDS"} \
      ${ENV_KWARGS:+--env-kwargs "$ENV_KWARGS"} --evaluate "$EVAL_EPISODES" --random-policy $clip_flag
fi

# Resume at the round the saved policy has reached. A policy that trained past the budget still gets the
# last round's collect -> label -> train_reward, so a resumed run asks the whole label budget too.
step=$("$PYTHON" -c "import contract, sys; contract.run_main(lambda: print(contract.policy_step(sys.argv[1])))" "$RUN")
round=$(( step / STEPS_PER_ROUND < last_round ? step / STEPS_PER_ROUND : last_round ))
while [ $(( round * STEPS_PER_ROUND )) -lt "$TOTAL_STEPS" ]; do
  echo "=== round $round: policy step $(( round * STEPS_PER_ROUND ))/$TOTAL_STEPS" >&2
  run "$PYTHON" collect.py --run "$RUN" --env "$ENV_ID" ${ENV_KWARGS:+--env-kwargs "$ENV_KWARGS"} ${SEED:+--seed "$SEED"} \
      ${SEGMENT_SECONDS:+--segment-seconds "$SEGMENT_SECONDS"} --num-envs "$NUM_ENVS" --label-budget "$LABELS" \
      --schedule-steps "$schedule_end" --pretrain-fraction "$pretrain_fraction" --selection "$SELECTION" $clip_flag \
      $COLLECT_FLAGS
  case "$TEACHER" in
    human) run "$PYTHON" label.py wait --run "$RUN" --fraction "$HUMAN_FRACTION" ;;
    oracle) run "$PYTHON" label.py teach --run "$RUN" ;;
    *) run "$PYTHON" label.py teach --run "$RUN" $TEACHER_FLAGS ;;
  esac
  run "$PYTHON" train_reward.py --run "$RUN" --if-new-labels ${REWARD_INPUTS:+--inputs "$REWARD_INPUTS"} ${REWARD_STEPS:+--steps "$REWARD_STEPS"} \
      $REWARD_FLAGS
  round=$(( round + 1 ))
  target=$(( round * STEPS_PER_ROUND < TOTAL_STEPS ? round * STEPS_PER_ROUND : TOTAL_STEPS ))
  run "$PYTHON" train_policy.py --run "$RUN" --total-steps "$target" --anneal-steps "$TOTAL_STEPS" \
      --num-envs "$NUM_ENVS" --ent-coef "$ENT_COEF" \
      $( [ "$ENT_ANNEAL" = 1 ] && echo --ent-anneal ) $POLICY_FLAGS
done

# (--if-new-policy: a re-run of a finished loop does not evaluate the same policy again)
run "$PYTHON" collect.py --run "$RUN" --evaluate "$EVAL_EPISODES" --if-new-policy \
    $( [ "$CLIPS" = 0 ] && echo --no-clips )
"$PYTHON" - "$RUN" <<'PY'
import json, os, sys
import contract
run = sys.argv[1]
evals = [m for m in contract.read_jsonl(os.path.join(run, contract.METRICS)) if m.get("stage") == "evaluate"]
random = [m for m in evals if m["policy"] == "random"][-1]
trained = [m for m in evals if m["policy"] != "random"][-1]
print(f"\nrandom policy:  true return {random['true_return_mean']:9.1f} +- {random['true_return_std']:.1f}")
print(f"trained agent:  true return {trained['true_return_mean']:9.1f} +- {trained['true_return_std']:.1f}"
      f"  ({trained['policy_step']} steps, {len(contract.read_labels(run))} labels)")
if trained.get("clip"):
    print(f"clip of the trained agent: {os.path.join(run, trained['clip'])}")
print(f"learning curve:            {os.path.join(run, contract.LEARNING_CURVE)}")
PY
