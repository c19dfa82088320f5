#!/usr/bin/env bash
# urbanlens: one entry point.
#   bash run.sh                      set up what is missing, then run both demo pipelines end to end
#   bash run.sh test [pytest args]   set up, then run the test suite
#   bash run.sh cities [--config F] [--set k=v ...]   city identification stages in order
#   bash run.sh ses    [--config F] [--set k=v ...]   socioeconomic-status stages in order
#   bash run.sh bench                run the benchmarks in bench/
#   bash run.sh gpu-check [--cpu-dry-run]   check a GPU machine in one go (bench/gpu_check.py)
#   bash run.sh setup                only set up the environment;  bash run.sh --help  the usage
set -euo pipefail
cd "$(dirname "$0")"

# ---- environment: reuse the active venv/conda env, else ./.venv; install only what is missing
setup_env() {
  if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
    PY=python
  else
    [ -x .venv/bin/python ] || { echo "[setup] creating .venv"; python3 -m venv .venv; }
    PY=.venv/bin/python
  fi
  local stamp
  stamp="$($PY -c 'import sys; print(sys.prefix)')/.urbanlens-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    echo "[setup] installing dependencies into $($PY -c 'import sys; print(sys.prefix)') (once)"
    $PY -m pip install --disable-pip-version-check -q -e ".[test]"
    touch "$stamp"
  fi
  export PYTHONUNBUFFERED=1
  [ -t 2 ] || export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}  # quieter progress bars in logs
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads sleep instead of spinning
}

cfg_get() {  # cfg_get KEY ARGS...  -> resolved config value
  local key=$1; shift
  $PY -m urbanlens.core.config "$key" "$@"
}

demo_world_or_stop() {  # KIND DATA SAY ERROR ARGS...: build KIND's synthetic world, only in the demo data folder
  # a synthetic world only in the demo configs' own data folder; real data is never stood in for
  local kind=$1 data=$2 say=$3 error=$4; shift 4
  if [ "$(realpath -m "$data")" = "$(realpath -m data/demo)" ]; then
    echo "[$kind] $say"
    bash data_setup.sh --synthetic "$kind" "$@"
  else
    echo "error: $error" >&2
    exit 1
  fi
}

run_cities() {
  local args=("$@")
  [[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/cities_demo.yaml "${args[@]}")
  local data; data=$(cfg_get paths.data "${args[@]}")
  if [ ! -d "$data/cities/raw" ]; then
    demo_world_or_stop cities "$data" "no raw images under $data/cities/raw: building the synthetic demo world there" \
      "$data/cities/raw: no city images; place them as <City Name (IATA)>/<site>/<image> (.tif, .jp2, .png or .jpg, two or more sites per city), or build a synthetic world with 'bash data_setup.sh --synthetic cities' and the same --config" "${args[@]}"
  fi
  $PY preprocessing.py "${args[@]}"
  $PY train_classification.py "${args[@]}"
  $PY test_classification.py "${args[@]}"
  $PY saliency.py "${args[@]}"
  echo "[cities] results in $(cfg_get paths.results "${args[@]}")/cities"
}

run_site_validation() {  # demo: the classifier trained again, validated on a held-out train site instead of the test site's other half
  local args=("$@")
  local results; results=$(cfg_get paths.results "${args[@]}")
  local site=(--set cities.split.val=site --set "paths.results=$results/val_site")
  $PY train_classification.py "${args[@]}" "${site[@]}"
  $PY test_classification.py "${args[@]}" "${site[@]}"
  echo "[cities] cities.split.val=site results in $results/val_site/cities"
}

run_new_city() {  # demo: a held-out synthetic city, a new twin of one demo city -> which demo city it resembles
  local args=("$@")
  local data; data=$(cfg_get paths.data "${args[@]}")
  $PY -m urbanlens.cities.world --held-out "${args[@]}"
  local city
  for city in "$data"/cities/new/*/; do
    $PY similar_cities.py "${args[@]}" --images "${city%/}"
  done
}

run_ses() {
  local args=("$@")
  [[ " ${args[*]-} " == *" --config "* ]] || args=(--config configs/ses_demo.yaml "${args[@]}")
  local data; data=$(cfg_get paths.data "${args[@]}")
  if [ ! -d "$data/UA_data" ] || [ -z "$(ls -A "$data/UA_data" 2>/dev/null)" ]; then
    demo_world_or_stop ses "$data" "no Urban Atlas data under $data/UA_data: building the synthetic French world there" \
      "$data/UA_data: no Urban Atlas data; place the Copernicus Urban Atlas zips (or one folder per city) there, the INSEE census grid under $data/census_data and the IGN orthophoto deliveries under $data/aerial_data ('bash data_setup.sh' with the same --config says where to get each), or build a synthetic world with 'bash data_setup.sh --synthetic ses' and the same --config" "${args[@]}"
  fi
  $PY generate_fr_ua_aerial_data.py "${args[@]}"
  $PY efficientnet_training.py "${args[@]}"
  $PY gradcaming_urban_areas.py "${args[@]}"
  echo "[ses] results in $(cfg_get paths.results "${args[@]}")/ses"
}

usage() {
  cat <<'USAGE'
usage: bash run.sh [COMMAND] [--config FILE] [--set KEY=VALUE ...]
  (none) | demo      set up what is missing, then run both demo pipelines end to end
  setup              only set up the environment (./.venv, or the active venv/conda env)
  test [pytest args] set up, then run the test suite
  cities             city identification stages in order (default config configs/cities_demo.yaml)
  ses                socioeconomic-status stages in order (default config configs/ses_demo.yaml)
  bench              run the benchmarks in bench/
  gpu-check [--cpu-dry-run]   check a GPU machine in one go (bench/gpu_check.py)
  help | --help      this message
USAGE
}

usage_error() {  # COMMAND PROBLEM: one line naming the command, then the usage; exit 2 before any setup
  echo "error: bash run.sh $1: $2" >&2
  usage >&2
  exit 2
}

check_flags() {  # COMMAND ARGS...: only --config FILE and --set KEY=VALUE, each with its value
  local cmd=$1; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --config|--set)
        if [ $# -lt 2 ] || [[ "$2" == -* ]]; then
          usage_error "$cmd" "$1 needs a value ($([ "$1" = --set ] && echo "KEY=VALUE, e.g. --set cities.train.epochs=5" || echo "a config file, e.g. configs/ses.yaml"))"
        fi
        if [ "$1" = --set ] && [[ "$2" != *=* ]]; then
          usage_error "$cmd" "--set $2: expected KEY=VALUE, e.g. --set cities.train.epochs=5"
        fi
        shift 2 ;;
      --config=*|--set=*) shift ;;
      -h|--help) usage; exit 0 ;;
      --c*|-c*) usage_error "$cmd" "unknown flag '$1' (did you mean --config?)" ;;
      --s*|-s*) usage_error "$cmd" "unknown flag '$1' (did you mean --set?)" ;;
      -*) usage_error "$cmd" "unknown flag '$1' (run.sh $cmd takes --config FILE and --set KEY=VALUE)" ;;
      *) usage_error "$cmd" "unexpected argument '$1' (a config file goes after --config, a value after --set)" ;;
    esac
  done
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in  # the command and its flags are checked before anything is installed or run
  help|-h|--help) usage; exit 0 ;;
  demo|cities|ses|setup) check_flags "$cmd" "$@" ;;
  test|bench|gpu-check) ;;  # their arguments go to pytest, the benchmarks, gpu_check.py
  -*) usage_error "$cmd" "a flag before the command; the command comes first, e.g. bash run.sh ses $cmd ..." ;;
  *) usage_error "$cmd" "unknown command '$cmd'" ;;
esac
setup_env
case "$cmd" in
  demo)
    start=$SECONDS
    run_cities --config configs/cities_demo.yaml "$@"
    run_site_validation --config configs/cities_demo.yaml "$@"
    run_new_city --config configs/cities_demo.yaml "$@"
    t_cities=$((SECONDS - start)); echo "[demo] cities pipeline took $t_cities s"
    start=$SECONDS
    run_ses --config configs/ses_demo.yaml "$@"
    t_ses=$((SECONDS - start)); echo "[demo] ses pipeline took $t_ses s"
    start=$SECONDS  # an income map where the census is missing: the demo world withholds blocks of cells
    $PY predict_income.py --config configs/ses_demo.yaml --city Paris "$@"
    t_map=$((SECONDS - start)); echo "[demo] income prediction took $t_map s"
    # the README's demo table, every number read from the files above, with the machine it ran on
    $PY -m urbanlens.summary --results "$(cfg_get paths.results --config configs/ses_demo.yaml "$@")" \
      --timing "cities=$t_cities" --timing "ses=$t_ses" --timing "income map=$t_map"
    ;;
  test)    $PY -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ;;  # one file per worker, files in parallel
  cities)  run_cities "$@" ;;
  ses)     run_ses "$@" ;;
  bench)   failed=()  # one benchmark that stops does not keep the others from running; named at the end
           for b in bench/*.py; do case "$b" in bench/gpu_check.py|bench/training_loader.py) continue ;; esac
             echo "== $b"; $PY "$b" "$@" || failed+=("$b"); done
           [ ${#failed[@]} -eq 0 ] || { echo "[bench] stopped with an error: ${failed[*]}" >&2; exit 1; } ;;
  gpu-check) $PY bench/gpu_check.py "$@" ;;
  setup)   echo "[setup] environment ready: $PY" ;;
esac
