//go:build race

package esker_test

// raceEnabled makes the crash test build cmd/esker with -race too: the
// process under test is checked, and the build reuses the test's cache.
const raceEnabled = true
