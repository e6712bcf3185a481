#!/usr/bin/env bash
# A local Ray "cluster" on this machine (2 CPUs), to exercise the `ray job submit` path:
#   bash cluster/local-2cpu.sh start
#   ray job submit --working-dir . -- python jobs/stage1.py --config debug --run /tmp/calm-run
#   bash cluster/local-2cpu.sh stop
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1} RAY_SERVE_ENABLE_DIRECT_INGRESS=0
case "${1:-}" in
  start) ray start --head --num-cpus="${NUM_CPUS:-2}" --include-dashboard=true --dashboard-host=127.0.0.1 --disable-usage-stats ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
