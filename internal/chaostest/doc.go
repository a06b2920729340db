// Package chaostest is esker's Jepsen-style chaos suite. It holds no code
// outside its tests: TestChaos runs three `esker node` processes (built from
// cmd/esker) against a three-broker kfake cluster hosted by the test
// process, drives a bank workload at them from concurrent clients while a
// seeded schedule of faults runs (kill -9 with the state directory kept or
// wiped, SIGSTOP/SIGCONT past the session timeout, broker-side request
// faults, partition leader moves, a broker removed and added back,
// coordinator moves, a fourth node joining and leaving), then heals the
// cluster and checks the recorded history against the events topic:
//
//   - per account the events topic, read_committed, holds versions 1..n with
//     no gap or repeat, and no command id is applied twice;
//   - every acknowledged command is applied exactly once at the acknowledged
//     version, every rejected one nowhere, every unknown one at most once;
//   - every node answers each account's state equal to the fold of its
//     events, and no balance is ever negative;
//   - each account's history of commands and reads is linearizable
//     (github.com/anishathalye/porcupine), and reads older than a write
//     already acknowledged when the read began are counted as stale reads.
//
// The suite is slow, so TestChaos is skipped unless ESKER_CHAOS_DURATION is
// set; the checker and the model have unit tests that always run and feed
// them hand-made histories with known anomalies, so a checker that cannot
// fail is caught by `go test ./...`.
//
//	ESKER_CHAOS_DURATION=2m go test -race -count=1 -run TestChaos -v ./internal/chaostest
//
// Other knobs (all optional): ESKER_CHAOS_SEED (reproduce a schedule),
// ESKER_CHAOS_FAULTS (comma-separated fault kinds to draw from, see
// faultKinds), ESKER_CHAOS_CLIENTS, ESKER_CHAOS_ACCOUNTS,
// ESKER_CHAOS_PARTITIONS, ESKER_CHAOS_SESSION_TIMEOUT,
// ESKER_CHAOS_NODE_LOG_LEVEL (the nodes' --log-level), ESKER_CHAOS_REPORT
// (a file the summary is appended to as one JSON line), ESKER_CHAOS_KEEP
// (keep the run directory even when the run passes),
// ESKER_CHAOS_KFAKE_EPOCH_FIX=0 (run without the correction of a kfake bug,
// see fixLeaderEpochs).
package chaostest
