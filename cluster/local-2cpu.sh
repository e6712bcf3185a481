#!/usr/bin/env bash
# A local Ray "cluster" on this machine (2 CPUs), to exercise the `ray job submit` path:
#   bash cluster/local-2cpu.sh start
#   export RAY_AUTH_MODE=token                  # a client sends the token only in token mode
#   ray job submit --working-dir . -- python jobs/stage1.py --config debug --run /tmp/calm-run
#   bash cluster/local-2cpu.sh stop
# Token authentication is on whatever mode the caller exported: the head's GCS and raylet ports
# listen on every interface of the machine, and its dashboard (127.0.0.1 here) accepts jobs. The
# token is RAY_AUTH_TOKEN or the file at RAY_AUTH_TOKEN_PATH when set, else ~/.ray/auth_token,
# made here the first time (`ray get-auth-token` prints it).
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1} RAY_SERVE_ENABLE_DIRECT_INGRESS=0
case "${1:-}" in
  start)
    if ! ray get-auth-token >/dev/null 2>&1; then
      ray get-auth-token --generate >/dev/null 2>&1
      chmod 600 ~/.ray/auth_token  # Ray writes it readable by every user of the machine
    fi
    # the dashboard agent, which runs submitted jobs, on a free port (AGENT_PORT to choose it): on Ray's
    # default 52365, a Ray already on the machine (a job's private ray.init, another user's head) keeps
    # this head's agent from serving and every `ray job submit` fails "No available agent to submit job"
    agent_port=${AGENT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    ray start --head --num-cpus="${NUM_CPUS:-2}" --include-dashboard=true --dashboard-host=127.0.0.1 \
      --dashboard-agent-listen-port="$agent_port" --disable-usage-stats ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
