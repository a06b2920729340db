//go:build race

package chaostest

// raceEnabled makes the suite build cmd/esker with -race too, so the node
// processes under test are checked by the race detector as well.
const raceEnabled = true
