#!/usr/bin/env bash
# A newcomer's first start, timed: `bash bench/first_start.sh [REPO]` clones REPO (default: this
# checkout's committed HEAD) into a scratch folder, runs `make run` there with no
# DATABASE_URL (the embedded PostgreSQL), and prints the seconds from the start to the first
# call served (a Jobs CreateJob over gRPC), and to the end of the install. Ports 50051-50053
# must be free. The scratch folder is removed at the end.
set -euo pipefail
repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
scratch="$(mktemp -d)"
run=""
stop() {
    if [ -n "$run" ]; then kill -TERM -- "-$run" 2>/dev/null || true; wait "$run" 2>/dev/null || true; fi
    rm -rf "$scratch"
}
trap stop EXIT
git clone --quiet "$repo" "$scratch/suite"
cd "$scratch/suite"
unset DATABASE_URL
start=$(date +%s.%N)
setsid make run >"$scratch/run.log" 2>&1 &
run=$!
until [ -f .venv/.installed ]; do sleep 0.2; kill -0 "$run" 2>/dev/null || { cat "$scratch/run.log"; exit 1; }; done
installed=$(date +%s.%N)
call='import grpc, sys
sys.path.insert(0, "gen")
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel("localhost:50051"))
stub.CreateJob(jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="first-call")),
               metadata=(("x-profile-id", "store-first"),), timeout=1)'
until .venv/bin/python -c "$call" 2>/dev/null; do
    kill -0 "$run" 2>/dev/null || { cat "$scratch/run.log"; exit 1; }
    sleep 0.2
done
served=$(date +%s.%N)
python3 -c "print(f'installed after {$installed - $start:.1f} s; first call served after {$served - $start:.1f} s')"
