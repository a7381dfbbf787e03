# The million's run, shared by benchmarks/million.sh (the service) and benchmarks/floor_million.sh
# (its floor), so both ask the same of comet-bench: sourced by them, not run.
# 1,000,000 clients at 4,000 connects a second (25 in flight), held 10 minutes, then 3 broadcasts
# 5 s apart, each given 120 s to reach everyone. Flags given after OUT_DIR to either script come
# later on comet-bench's command line and win (e.g. --hold 60).
# shellcheck disable=SC2034 # used by the scripts that source this file
MILLION_FLAGS="--conns 1000000 --rate 4000 --concurrency 25 --hold 600 --ramp-timeout 1800 \
--broadcasts 3 --broadcast-timeout 120 --broadcast-gap 5"
