#!/usr/bin/env bash
# Data layout and downloads.
#   bash data_setup.sh [--config F]                      create data/ folders, fetch what is public, say what to fetch by hand
#   bash data_setup.sh --synthetic [cities|ses|all] [--config F] [--set k=v ...]   build synthetic worlds
#     (without --config: cities from configs/cities_demo.yaml, ses from configs/ses_demo.yaml)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then PY=python; else PY=.venv/bin/python; fi
fi
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "error: no Python environment; run 'bash run.sh setup' first" >&2; exit 2; }

if [ "${1:-}" = "--synthetic" ]; then
  shift
  which=all
  case "${1:-}" in cities|ses|all) which=$1; shift ;; esac
  # without --config each world is built from its own pipeline's demo config; with --config both use it
  cities_args=(--config configs/cities_demo.yaml "$@")
  ses_args=(--config configs/ses_demo.yaml "$@")
  for arg in "$@"; do
    case "$arg" in --config|--config=*) cities_args=("$@"); ses_args=("$@") ;; esac
  done
  [ "$which" = ses ] || $PY -m urbanlens.cities.world "${cities_args[@]}"
  [ "$which" = cities ] || $PY -m urbanlens.ses.world "${ses_args[@]}"
  exit 0
fi

[[ " ${*-} " == *" --config "* ]] || set -- --config configs/ses.yaml "$@"
DATA=$($PY -m urbanlens.core.config paths.data "$@")
RESULTS=$($PY -m urbanlens.core.config paths.results "$@")
mkdir -p "$DATA/cities/raw" "$DATA/census_data" "$DATA/UA_data" "$DATA/aerial_data" "$RESULTS/cities" "$RESULTS/ses"
echo "created $DATA/{cities/raw,census_data,UA_data,aerial_data} and $RESULTS/{cities,ses}"

INSEE_URL="https://www.insee.fr/fr/statistiques/fichier/7655475/Filosofi2019_carreaux_200m_gpkg.zip"
CENSUS="$DATA/$($PY -m urbanlens.core.config ses.census_file "$@")"
ZIP="$DATA/census_data/Filosofi2019_carreaux_200m_gpkg.zip"
if [ -f "$CENSUS" ]; then
  echo "census grid present: $CENSUS"
elif [ -f "$ZIP" ] || curl -fsSL --max-time 600 -o "$ZIP.part" "$INSEE_URL" 2>/dev/null; then
  [ -f "$ZIP" ] || mv "$ZIP.part" "$ZIP"
  # INSEE's zip holds a .7z holding carreaux_200m_{met,mart,reun}.gpkg: unpacked with py7zr; a failure
  # prints one error line and stops this script with a non-zero status
  $PY -m urbanlens.ses.archives "$ZIP" "$(dirname "$CENSUS")" "$(basename "$CENSUS")"
  echo "census grid downloaded and unpacked: $CENSUS"
else
  rm -f "$ZIP.part"
  echo "offline: download the INSEE Filosofi 2019 200 m grid by hand from"
  echo "  $INSEE_URL"
  echo "  into $DATA/census_data/ and run this script again (it unpacks the zip and the 7z inside);"
  echo "  the 2015 shapefile works too (columns IdINSPIRE, Ind, Ind_snv): set ses.census_file to it"
fi
cat <<MSG

By hand (accounts needed):
- Urban Atlas 2018 (or 2012) for Paris, Lyon, Nice, Marseille, Lille:
    https://land.copernicus.eu/en/products/urban-atlas  -> put the portal's zip (zips inside) or each
    city's zip or folder into $DATA/UA_data/ (zips are read as they are)
- IGN BD ORTHO 0.20 m JP2 tiles (with their *dalles.shp tile index) for the same departments:
    https://geoservices.ign.fr/bdortho  -> unpack each department's delivery into $DATA/aerial_data/
    (RVB is read; IRC deliveries beside it are ignored unless ses.ortho_product=IRC)
- City satellite images (DL-SLICER, 45 cities): request access from the authors, then place them as
    $DATA/cities/raw/<City Name (IATA)>/<site>/<image> (.tif, .jp2, .png or .jpg; any bit depth, see README "City images")
MSG
