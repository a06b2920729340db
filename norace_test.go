//go:build !race

package esker_test

const raceEnabled = false
